"""Per-GPU memory plan of PPO's six models (and of the single-model stages), from the real code.

    python bench/memory_plan.py --preset llama-3-8b --gpus 8 --algo ppo_lag --micro-batch 16 --max-length 512
    python bench/memory_plan.py --preset llama-7b --gpus 8 --offload-frozen --gpu-gb 80
    python bench/memory_plan.py --dim 512 --layers 8 --heads 8 --kv-heads 4 --vocab 32000 --hidden 1408 \
        --gpus 2 --micro-batch 4 --max-length 128 --precision fp32 --device cpu     # what bench/measure_memory.py checks
    python bench/memory_plan.py --preset llama-7b --gpus 8 --stage sft --micro-batch 4

How the figures are obtained (nothing below is a hand formula for the total):

* The models are the real `model.Transformer`s, sharded by the real `training.shard` (FSDP2 per block,
  then the root; MixedPrecisionPolicy bf16 params / fp32 reduce; frozen models stored in bf16 under
  mixed precision, as `training.load_model` does) on a *fake* process group of `--gpus` ranks
  (torch.testing's "fake" backend: one process plays rank 0, collectives do nothing), with every tensor
  a FakeTensor (shapes, dtypes and storage sizes, no data). One PPO iteration then runs through the
  real code paths: generation inside `training.gathered(actor)` through `Transformer._forward_cached`,
  `KVCache` and `sample_token`; the scoring forwards of `ppo_lag.logprobs` / `ppo_lag.values_of` and
  the reward and cost models into `ppo_lag.Rollout`s; the actor's and each critic's forward + backward
  (`ppo_lag.actor_loss` / `critic_loss`, PTX batches through `training.sft_nll` with --ptx), gradient
  clipping and `training.build_optimizer`'s AdamW, whose state exists (one step on zero gradients
  creates it first: the steady state of every iteration after the first).
* A TorchDispatchMode (`LiveMemory`) records every tensor storage as it is created (and FSDP2's
  storage resizes), with the place in the code that allocated it, and frees it when the storage dies:
  the live bytes at every moment, their peak per phase, and what the peak is made of. The same
  accounting runs on real tensors in bench/measure_memory.py, beside an allocator-level measurement
  (bench/validate_memory_plan.py: with 2 and 4 gloo ranks on CPU, fp32 and bf16, the plan's phase
  peaks are within 4.1 % of the measured ones, never above; bench/RESULTS.md).
* What cannot run on fake tensors is replaced by a stand-in with the same allocations: the few
  host syncs (`positions_from_mask`'s hole check, `_masks`' all-rows check, the chunk search of the
  PyTorch log-prob path); `generate()`'s loop is replayed for a few decode steps (the KV cache is
  preallocated at full length on the first write, so memory does not grow after that); and with
  `--device cuda` (default) the Triton kernels' host code runs with the kernel launches skipped, so
  their buffers (flash attention's out/lse/delta/dq/dk/dv, the fused log-prob's partials and [N, C]
  gradient chunk) are the real ones, and AdamW uses its CUDA default (foreach). `--device cpu` keeps
  the PyTorch kernel paths (CPU flash SDPA, chunked log-probs) and the single-tensor AdamW of CPUs.
* Every sequence is assumed to run to `--max-length` (the worst case: no answer stops early), and
  the advantages and returns `ppo_lag.advantages` adds to each rollout are allocated directly (its
  GAE loop would cost one fake op per token and allocates nothing else that lives on).

Figures are bytes allocated by tensors (torch.cuda.max_memory_allocated's notion). The verdict adds
a stated margin for what that does not see: allocator fragmentation/caching (`--frag-margin`, 10 % of
the peak) plus CUDA context and NCCL buffers (`--fixed-margin-gb`, 2 GiB).

Host memory: `--offload-frozen` keeps the frozen models' shards, `--cpu-offload` the trained models'
shards, gradients and AdamW state in host memory (FSDP2's CPUOffloadPolicy); the plan counts those in
a separate host column (the short-lived per-block device copies of an offloaded shard, 1/world of a
block, are not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._guards import active_fake_mode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from model import PRESETS, ModelArgs, Transformer  # noqa: E402

GiB = 2**30

# ----------------------------------------------------------------------------------------------
# Categories of the breakdown, in print order: (key, label)

CATEGORIES = [
    ("params", "parameters (FSDP shards, all models)"),
    ("optimizer", "AdamW state (exp_avg, exp_avg_sq)"),
    ("grads", "gradients (sharded, fp32)"),
    ("gathered", "gathered parameters (unsharded copies, all-gather buffers)"),
    ("grad_buffers", "gradient buffers (unsharded grads, reduce-scatter input)"),
    ("activations", "activations and their gradients, temporaries"),
    ("logprob", "log-prob / logit buffers (LM head kernel)"),
    ("kv_cache", "KV cache"),
    ("sampling", "sampling buffers (noise, logits of the last position)"),
    ("optimizer_temp", "optimizer step / grad-clip temporaries"),
    ("load", "state-dict loading buffers"),
    ("collective", "buffers inside collectives (gloo's reduce-scatter copy)"),
]


# ----------------------------------------------------------------------------------------------
# Sharding arithmetic (FSDP2: every parameter is split on dim 0 into world chunks of ceil(dim0 / world)
# rows; each rank stores one chunk padded to that size)


def param_shapes(args: ModelArgs, head: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the real Transformer (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(args, head=head)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shard_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's padded FSDP2 shard of a parameter of this shape."""
    if not shape:
        return 1
    rows = -(-shape[0] // world)
    return rows * math.prod(shape[1:])


def model_state_bytes(args: ModelArgs, head: str, world: int, *, trainable: bool, mixed_precision: bool) -> dict:
    """Per-rank bytes of one model's parameters, gradients and AdamW state, by the sharding rule.

    Parameters are stored in fp32, except frozen models under mixed precision (bf16, as
    training.load_model does); gradients are fp32 (FSDP's reduce dtype) and AdamW keeps two fp32
    tensors per parameter (its per-parameter `step` counter is a host scalar)."""
    shapes = param_shapes(args, head)
    numel = sum(shard_numel(s, world) for s in shapes.values())
    full = sum(math.prod(s) for s in shapes.values())
    param_bytes = 2 if (mixed_precision and not trainable) else 4
    return {
        "numel": full,
        "shard_numel": numel,
        "params": numel * param_bytes,
        "grads": numel * 4 if trainable else 0,
        "optimizer": 2 * numel * 4 if trainable else 0,
    }


# ----------------------------------------------------------------------------------------------
# Live-tensor accounting


def _site(frame) -> str:
    """Category of a new storage from the code that allocates it (innermost match wins)."""
    while frame is not None:
        code = frame.f_code
        path, name = code.co_filename.replace("\\", "/"), code.co_name
        if path.endswith("/model.py"):
            if name == "update":
                return "kv_cache"
            if name == "sample_token":
                return "sampling"
        elif path.endswith("kernels/logprob.py"):
            return "logprob"
        elif "/torch/optim/" in path:
            return "optimizer" if name == "_init_group" else "optimizer_temp"
        elif path.endswith("clip_grad.py"):
            return "optimizer_temp"
        elif "/_fully_shard/" in path:
            if name == "foreach_reduce":
                # the reduce-scatter output becomes (or is added to) the sharded gradient
                return "grads" if "reduce_scatter_input" in frame.f_locals else "grad_buffers"
            if name in ("foreach_all_gather", "foreach_all_gather_copy_out", "_get_param_all_gather_inputs",
                        "init_all_gather_outputs", "alloc_all_gather_outputs", "wait_for_unshard", "unshard"):
                return "gathered"
            if name in ("reset_sharded_param", "_init_sharded_param"):
                return "params"
        elif name == "to_empty":
            return "params"
        elif "checkpoint/state_dict" in path or "/hf_io.py" in path:
            return "load"
        elif path.endswith("distributed_c10d.py"):
            return "collective"  # e.g. the full-size copy gloo's reduce-scatter hands back on wait()
        frame = frame.f_back
    return "activations"


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storages, by category, with the peak per phase.

    Every storage an op creates is recorded once (views share it), with the category of the code that
    allocated it (`_site`), and removed when it is freed (a weak reference's callback). FSDP2 frees and
    re-allocates unsharded parameters by resizing their storage in place, which no op reports:
    `UntypedStorage.resize_` is wrapped while the mode is active. Storages created under `host()`
    (or retagged with host=True) count as host memory, not device memory.

    Works on real tensors and on FakeTensors alike (a FakeTensor's storage has its real byte size)."""

    def __init__(self):
        super().__init__()
        self.entries: dict[int, list] = {}  # id(storage) -> [weakref, nbytes, category, host]
        self.device_by_cat: dict[str, int] = defaultdict(int)
        self.host_by_cat: dict[str, int] = defaultdict(int)
        self.device_total = 0
        self.host_total = 0
        self.host_depth = 0
        self.host_cats: set[str] = set()
        self.forced_category: str | None = None
        self.phases: dict[str, dict] = {}
        self.current: dict | None = None
        self.paused = 0
        # Categories kept out of the device total (bench/measure_memory.py: gloo's collective
        # buffers, which NCCL keeps outside PyTorch's allocator); their own peak is still recorded.
        self.uncounted: set[str] = set()
        self.uncounted_now: dict[str, int] = defaultdict(int)
        self.uncounted_peak: dict[str, int] = defaultdict(int)
        self._orig_resize = None

    # -- bookkeeping ------------------------------------------------------------------------------

    def _add(self, key, nbytes, cat, host):
        if cat in self.uncounted:
            self.uncounted_now[cat] += nbytes
            self.uncounted_peak[cat] = max(self.uncounted_peak[cat], self.uncounted_now[cat])
            return
        if host:
            self.host_by_cat[cat] += nbytes
            self.host_total += nbytes
            if self.current is not None and self.host_total > self.current["host_peak"]:
                self.current["host_peak"] = self.host_total
        else:
            self.device_by_cat[cat] += nbytes
            self.device_total += nbytes
            if nbytes > 0 and self.current is not None:
                if self.device_total > self.current["peak"]:
                    self.current["peak"] = self.device_total
                    self.current["breakdown"] = dict(self.device_by_cat)
                cat_peak = self.current["cat_peak"]
                if self.device_by_cat[cat] > cat_peak.get(cat, 0):
                    cat_peak[cat] = self.device_by_cat[cat]

    def _freed(self, key, ref=None):
        entry = self.entries.get(key)
        if entry is not None and (ref is None or entry[0] is ref):
            del self.entries[key]
            self._add(key, -entry[1], entry[2], entry[3])

    def track(self, storage, cat: str | None = None, frame=None):
        key = id(storage)
        entry = self.entries.get(key)
        if entry is not None:
            if entry[0]() is storage:
                return
            self._freed(key)  # a dead storage's id reused
        if cat is None:
            cat = self.forced_category or _site(frame or sys._getframe(2))
        nbytes = storage.nbytes()
        host = self.host_depth > 0 or cat in self.host_cats
        self.entries[key] = [weakref.ref(storage, lambda r, k=key: self._freed(k, r)), nbytes, cat, host]
        self._add(key, nbytes, cat, host)

    def retag(self, tensor: torch.Tensor, cat: str | None = None, host: bool | None = None):
        """Move a tracked tensor's storage to another category and/or to host memory."""
        if hasattr(tensor, "_local_tensor"):
            tensor = tensor._local_tensor
        st = tensor.untyped_storage()
        entry = self.entries.get(id(st))
        if entry is None or entry[0]() is not st:
            self.track(st, cat or "activations")
            entry = self.entries[id(st)]
        self._add(None, -entry[1], entry[2], entry[3])
        entry[2] = cat or entry[2]
        entry[3] = entry[3] if host is None else host
        self._add(None, entry[1], entry[2], entry[3])

    @contextlib.contextmanager
    def host(self):
        """Storages created inside count as host memory (CPU offload)."""
        self.host_depth += 1
        try:
            yield
        finally:
            self.host_depth -= 1

    @contextlib.contextmanager
    def host_categories(self, *cats: str):
        """Storages of these categories created inside count as host memory."""
        previous, self.host_cats = self.host_cats, self.host_cats | set(cats)
        try:
            yield
        finally:
            self.host_cats = previous

    @contextlib.contextmanager
    def category(self, cat: str):
        """Storages created inside get this category (when the call site does not say)."""
        previous, self.forced_category = self.forced_category, cat
        try:
            yield
        finally:
            self.forced_category = previous

    @contextlib.contextmanager
    def phase(self, name: str):
        """Record the device peak inside, what it was made of, each category's own largest value
        (cat_peak), and the host peak."""
        outer = self.current
        record = {"start": self.device_total, "peak": self.device_total, "breakdown": dict(self.device_by_cat),
                  "cat_peak": dict(self.device_by_cat), "host_start": self.host_total, "host_peak": self.host_total}
        self.current = record
        try:
            yield record
        finally:
            record["end"] = self.device_total
            self.phases[name] = record
            self.current = outer
            if outer is not None and record["peak"] > outer["peak"]:
                outer["peak"], outer["breakdown"] = record["peak"], dict(record["breakdown"])
            if outer is not None:
                outer["host_peak"] = max(outer["host_peak"], record["host_peak"])
                for cat, v in record["cat_peak"].items():
                    outer["cat_peak"][cat] = max(outer["cat_peak"].get(cat, 0), v)

    def snapshot(self) -> dict:
        return {"device": dict(self.device_by_cat), "host": dict(self.host_by_cat),
                "device_total": self.device_total, "host_total": self.host_total}

    # -- the mode ---------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor unwrap into local ops, which come back here
        out = func(*args, **(kwargs or {}))
        if self.paused or active_fake_mode() is not self._fake_mode_on_entry:
            return out  # DTensor's shape propagation on global-shape fake tensors: no memory
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    st = t.untyped_storage()
                except (NotImplementedError, RuntimeError):  # e.g. sparse or nested tensors
                    continue
                self.track(st, frame=sys._getframe(1))
        return out

    def __enter__(self):
        tracker = self
        self._orig_resize = orig = torch.UntypedStorage.resize_

        def resize_(st, size):
            out = orig(st, size)
            entry = tracker.entries.get(id(st))
            if entry is None or entry[0]() is not st:
                tracker.track(st, frame=sys._getframe(1))
            elif st.nbytes() != entry[1]:
                delta = st.nbytes() - entry[1]
                entry[1] = st.nbytes()
                tracker._add(None, delta, entry[2], entry[3])
            return out

        torch.UntypedStorage.resize_ = resize_
        # DTensor derives output shapes by running each op on global-shape fake tensors, in the
        # ambient fake mode when there is one (the plan's): those tensors are not memory.
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._orig_propagate = propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def paused_propagate(*args, **kwargs):
            tracker.paused += 1
            try:
                return propagate(*args, **kwargs)
            finally:
                tracker.paused -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = paused_propagate
        self._fake_mode_on_entry = active_fake_mode()
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        torch.UntypedStorage.resize_ = self._orig_resize
        ShardingPropagator._propagate_tensor_meta_non_cached = self._orig_propagate
        return super().__exit__(*exc)


def tag_unsharded_grads(model, tracker: LiveMemory):
    """Move the gradients FSDP2's unsharded parameters receive in backward (before the per-block
    reduce-scatter frees them) from 'activations' to 'grad_buffers' (hooks on FSDP internals;
    call after the model's first forward, which creates the unsharded parameters)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for fsdp_param in [fp for g in groups if g is not None for fp in g.fsdp_params]:
            param = getattr(fsdp_param, "_unsharded_param", None)
            if param is None or getattr(param, "_memplan_hooked", False) or not param.requires_grad:
                continue
            param.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "grad_buffers"))
            param._memplan_hooked = True


# ----------------------------------------------------------------------------------------------
# Stand-ins for what cannot run on fake tensors (same tensors, minus the host syncs)

_LEFT_PADDED = [True]


def _positions_from_mask_sync_free(input_ids, attention_mask):
    """model.positions_from_mask without its host-synced checks: kv_start is kept when the batch is
    declared left-padded (PPO's sequences), dropped otherwise (right-padded SFT and score batches)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.arange(T, device=input_ids.device).expand(B, T), None
    mask = attention_mask.long()
    seen = mask.cumsum(-1)
    kv_start = (seen == 0).sum(-1)
    last = T - (mask.flip(-1).cumsum(-1) == 0).sum(-1)
    torch.stack([((last - kv_start != seen[:, -1]) & (seen[:, -1] > 0)).any(), kv_start.any()])
    return (seen - 1).clamp(min=0), (kv_start if _LEFT_PADDED[0] else None)


def _masks_sync_free(batch, q_len, k_len, causal, kv_start, device):
    """kernels.attention._masks without the `every row sees a key` host check (every real row does)."""
    import kernels.attention as attention

    key = (kv_start, None if kv_start is None else kv_start._version, batch, q_len, k_len, causal, device)
    cached_key, cached = attention._last_masks
    if cached_key is not None and cached_key[0] is kv_start and cached_key[1:] == key[1:]:
        return cached
    visible = attention.visible_keys_mask(batch, q_len, k_len, causal=causal, kv_start=kv_start, device=device)
    masks = None
    if visible is not None:
        visible.any(dim=-1, keepdim=True)
        masks = (visible, None)
    attention._last_masks[:] = [key, masks]
    return masks


def _targets_in_sync_free(targets, start, end):
    """kernels.logprob._targets_in without nonzero() (data-dependent size): every row, clamped column."""
    return torch.arange(targets.shape[0], device=targets.device), (targets - start).clamp(0, end - start - 1)


class _NoLaunch:
    """A Triton kernel whose launch does nothing (fake tensors have no data)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


H100_SMS = 132


@contextlib.contextmanager
def sync_free_code(device: str):
    """Patch, for the duration, the few functions that need tensor values; with device 'cuda' route
    attention and log-probs through the Triton paths' host code with the launches skipped."""
    import kernels
    import kernels.attention as attention
    import kernels.logprob as logprob
    import model as model_module

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(model_module, "positions_from_mask", _positions_from_mask_sync_free)
    patch(attention, "_masks", _masks_sync_free)
    patch(logprob, "_targets_in", _targets_in_sync_free)
    if device == "cuda":
        if not kernels.TRITON_AVAILABLE:
            raise RuntimeError("--device cuda replays the Triton kernels' allocations: install triton (requirements.txt)")
        patch(kernels, "use_triton", lambda tensor: True)
        patch(attention, "_launch", lambda *a, **k: None)
        patch(attention, "_attn_bwd_delta_kernel", _NoLaunch())
        patch(logprob, "_launch", lambda *a, **k: None)
        patch(logprob, "_num_vocab_splits",
              lambda rows, device: max(1, min(32, -(-4 * H100_SMS // -(-rows // 128)))))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@torch.no_grad()
def generate_replay(model, prompt_ids, prompt_mask, max_new_tokens: int, decode_steps: int, pad_id: int,
                    eos_id: int, noise_rows):
    """Transformer.generate, line for line, minus its host syncs (the left-padding check, the
    every-row-finished check), for the first `decode_steps` tokens: the output buffer, one KVCache
    per layer (preallocated at prompt + max_new_tokens on its first write), the prefill, the RoPE
    tables of every decoding step, then sampled tokens. A step allocates nothing that outlives it,
    so more steps would not change the peak. Keep in step with model.py's generate()."""
    import model as model_module

    B, T = prompt_ids.shape
    total = T + max_new_tokens
    positions, kv_start = model_module.positions_from_mask(prompt_ids, prompt_mask)
    out = torch.full((B, total), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    out[:, :T] = prompt_ids
    caches = [model_module.KVCache(B, total) for _ in model.layers]
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    inv_freq = model_module.rope_inv_freq(model.args, prompt_ids.device)
    logits = model._forward_cached(prompt_ids, model_module.rope_cos_sin(inv_freq, positions, torch.float32),
                                   kv_start, caches, 0)
    steps = torch.arange(max(max_new_tokens - 1, 0), device=prompt_ids.device)
    cos, sin = model_module.rope_cos_sin(inv_freq, next_pos + steps, torch.float32)
    for step in range(min(decode_steps, max_new_tokens)):
        token = model_module.sample_token(logits.float(), 1.0, 1.0, None, noise_rows)
        token.masked_fill_(finished, pad_id)
        finished |= token == eos_id
        out.select(1, T + step).copy_(token)
        if step + 1 == max_new_tokens:
            break
        logits = model._forward_cached(token[:, None], (cos[:, step:step + 1], sin[:, step:step + 1]),
                                       kv_start, caches, T + step)
    return out


# ----------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class PlanConfig:
    args: ModelArgs
    world: int = 8
    stage: str = "ppo"  # ppo | sft | score
    algo: str = "ppo_lag"  # ppo_lag | ppo | reward_shaping
    micro_batch: int = 16
    max_length: int = 512  # tokens per sequence (PPO: prompt + answer)
    max_new_tokens: int | None = None  # PPO answer length (default half of max_length)
    rollout_batch: int | None = None  # PPO prompts per iteration over all ranks (default micro_batch x world)
    precision: str = "bf16"
    activation_checkpointing: bool = True
    offload_frozen: bool = False
    cpu_offload: bool = False
    ptx: bool = False
    device: str = "cuda"  # cuda: Triton kernels, foreach AdamW; cpu: PyTorch kernel paths, single-tensor AdamW
    decode_steps: int = 2
    other_ac: bool = True  # also run the learning phase with activation checkpointing flipped

    def __post_init__(self):
        if self.max_new_tokens is None:
            self.max_new_tokens = self.max_length // 2
        if self.rollout_batch is None:
            self.rollout_batch = self.micro_batch * self.world
        if self.stage == "ppo" and not 0 < self.max_new_tokens < self.max_length:
            raise ValueError("--max-new-tokens must lie between 0 and --max-length (prompt + answer)")
        if self.rollout_batch % (self.micro_batch * self.world):
            raise ValueError("--rollout-batch must be a multiple of --micro-batch x --gpus")

    @property
    def mixed_precision(self) -> bool:
        return self.precision == "bf16"

    def model_specs(self) -> list[tuple[str, str, bool]]:
        """(name, head, trainable) in ppo_lag.load_models' order."""
        if self.stage == "sft":
            return [("model", "lm", True)]
        if self.stage == "score":
            return [("model", "score", True)]
        specs = [("actor", "lm", True), ("reference", "lm", False), ("reward_model", "score", False)]
        if self.algo != "ppo":
            specs.append(("cost_model", "score", False))
        specs.append(("reward_critic", "score", True))
        if self.algo == "ppo_lag":
            specs.append(("cost_critic", "score", True))
        return specs

    def offloaded(self, trainable: bool) -> bool:
        return self.cpu_offload if trainable else self.offload_frozen


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks, this process being rank 0 (collectives do nothing)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the memory plan needs its own (fake) process group: run it in a fresh process")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def simulate(cfg: PlanConfig) -> dict:
    """Run one steady-state iteration on fake tensors; return the per-phase peaks and breakdowns."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import training

    t0 = time.time()
    tracker = LiveMemory()
    _LEFT_PADDED[0] = cfg.stage == "ppo"

    with fake_world(cfg.world) as mesh:
        d = training.Dist(0, cfg.world, 0, torch.device("cpu"), mesh, cfg.mixed_precision)
        models = {}
        # training.load_model, minus reading the weights: meta init, shard (the real training.shard),
        # then materialise (below, on fake tensors).
        for name, head, trainable in cfg.model_specs():
            dtype = torch.bfloat16 if d.mixed_precision and not trainable else torch.float32
            with torch.device("meta"):
                models[name] = Transformer(cfg.args, head=head).to(dtype)
            training.shard(models[name], d, cpu_offload=False, frozen=not trainable)
        with FakeTensorMode(allow_non_fake_inputs=True), sync_free_code(cfg.device), tracker:
            return _simulate(cfg, d, models, tracker, t0)


def _simulate(cfg, d, models, tracker, t0):
    import ppo_lag
    import training
    from model import end_scores

    result = {"phases": {}, "models": {}}
    optimizers = {}
    with tracker.phase("setup"):
        for name, head, trainable in cfg.model_specs():
            model = models[name]
            with (tracker.host() if cfg.offloaded(trainable) else contextlib.nullcontext()):
                model.to_empty(device="cpu")
            model.activation_checkpointing = cfg.activation_checkpointing
            model.requires_grad_(trainable)
            if not trainable:
                model.eval()
            models[name] = model
            if trainable:
                optimizers[name] = training.build_optimizer(model, 1e-5, 0.01)[0]
                if cfg.device == "cuda":
                    for group in optimizers[name].param_groups:
                        group["foreach"] = True  # torch's default for CUDA tensors
            result["models"][name] = {"head": head, "trainable": trainable,
                                      "offloaded": cfg.offloaded(trainable)}

    def offloading(name):
        return tracker.host() if cfg.offloaded(name in optimizers) else contextlib.nullcontext()

    # Steady state (the second iteration on): the AdamW state exists. One step on zero gradients
    # creates it, through the optimizer's own code.
    with tracker.phase("optimizer state"):
        for name, optimizer in optimizers.items():
            with offloading(name):
                for p in models[name].parameters():
                    p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    result["resident"] = tracker.snapshot()

    b, L = cfg.micro_batch, cfg.max_length

    def train_one(name, label, loss_fn, batches, step=True, suffix=""):
        """training.train_step's memory: forward and backward per micro-batch, then gradient
        clipping, the AdamW step and zero_grad (phases "<label> fwd+bwd" and "<label> step")."""
        model, optimizer = models[name], optimizers[name]
        model.train()
        with tracker.phase(label + " fwd+bwd" + suffix):
            for batch in batches:
                loss = loss_fn(model, batch)
                tag_unsharded_grads(model, tracker)
                # With --cpu-offload each block's reduced gradient shard is copied to host memory.
                with (tracker.host_categories("grads") if cfg.cpu_offload else contextlib.nullcontext()):
                    loss.backward()
                del loss
        if not step:
            for p in model.parameters():
                p.grad = None
            return
        with tracker.phase(label + " step"), offloading(name):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def learn(plan):
        """plan: [(model name, label, loss_fn, batches)]. Runs them with the configured activation
        checkpointing ("learning"), then, unless --no-flip, forward and backward again with it
        flipped ("learning (AC flipped)"; the optimizer step does not depend on it)."""
        settings = [cfg.activation_checkpointing] + ([not cfg.activation_checkpointing] if cfg.other_ac else [])
        for ac in settings:
            flipped = ac != cfg.activation_checkpointing
            for name in optimizers:
                models[name].activation_checkpointing = ac
            with tracker.phase("learning (AC flipped)" if flipped else "learning"):
                for name, label, loss_fn, batches in plan:
                    train_one(name, label, loss_fn, batches, step=not flipped, suffix=" (AC flipped)" if flipped else "")
        for name in optimizers:
            models[name].activation_checkpointing = cfg.activation_checkpointing

    if cfg.stage in ("sft", "score"):
        # sft.py: training.sft_nll on [B, L] dialogues; train_score.py: one forward over the [2B, L]
        # pairs (pair_end_scores), end scores into the ranking loss.
        ids = torch.zeros((b if cfg.stage == "sft" else 2 * b, L), dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}

        def stage_loss(model, batch):
            if model.head == "lm":
                return training.sft_nll(model, batch, d.device)[0]
            mask = batch["attention_mask"]
            return end_scores(model(batch["input_ids"], mask), mask).float().sum()

        learn([("model", "learning: " + cfg.stage, stage_loss, [batch])])
        result["phases"] = tracker.phases
        result["seconds"] = time.time() - t0
        return result

    # -- PPO: generation, scoring, learning (ppo_lag.rollout and ppo_update, one micro-batch per chunk)
    new = cfg.max_new_tokens
    prompt_len = L - new
    chunks = cfg.rollout_batch // (b * cfg.world)
    args = argparse.Namespace(algo=cfg.algo, kl_coeff=0.01, clip_range_score=50.0, gamma=1.0, gae_lambda=0.95,
                              clip_eps=0.2, clip_range_value=5.0, batch_size=cfg.rollout_batch)
    pad_id, eos_id = 0, 1
    actor = models["actor"]
    # Entered like generate(), which training.shard registers as an FSDP forward method: the root's
    # hooks (lazy init, input casting) run for it.
    from torch.distributed.fsdp import register_fsdp_forward_method

    actor.generate_replay = generate_replay.__get__(actor)
    register_fsdp_forward_method(actor, "generate_replay")
    samples = []
    with tracker.phase("generation"):
        actor.eval()
        with training.gathered(actor):
            for k in range(chunks):
                prompt_ids = torch.zeros((b, prompt_len), dtype=torch.long)
                prompt_mask = torch.ones_like(prompt_ids)
                seq = actor.generate_replay(prompt_ids, prompt_mask, new, cfg.decode_steps, pad_id, eos_id,
                                            noise_rows=(k * b, cfg.rollout_batch))
                mask = torch.ones_like(seq)
                action_mask = mask[:, 1:].clone()
                action_mask[:, :prompt_len - 1] = 0
                truncated = (seq[:, prompt_len:] == eos_id).sum(-1) == 0
                samples.append((seq, mask, action_mask.float(), truncated))
    with tracker.phase("scoring"), torch.no_grad():
        rollouts = []
        for seq, mask, action_mask, truncated in samples:
            reward = end_scores(models["reward_model"](seq, mask), mask).float()
            cost = (end_scores(models["cost_model"](seq, mask), mask).float() if "cost_model" in models
                    else torch.zeros_like(reward))
            rollouts.append(ppo_lag.Rollout(
                sequences=seq, attention_mask=mask, action_mask=action_mask, truncated=truncated,
                reward=reward, cost=cost,
                old_logp=ppo_lag.logprobs(actor, seq, mask, d).float(),
                ref_logp=ppo_lag.logprobs(models["reference"], seq, mask, d).float(),
                reward_values=ppo_lag.values_of(models["reward_critic"], seq, mask, d),
                cost_values=(ppo_lag.values_of(models["cost_critic"], seq, mask, d)
                             if "cost_critic" in models else None)))
        actor.train()
        del samples
    # ppo_lag.advantages fills four [B, L-1] fp32 tensors per rollout (its GAE loop would cost one
    # fake op per position and allocates nothing else that lives on).
    for r in rollouts:
        r.reward_advantages, r.reward_returns = torch.zeros_like(r.old_logp), torch.zeros_like(r.old_logp)
        if cfg.algo == "ppo_lag":
            r.cost_advantages, r.cost_returns = torch.zeros_like(r.old_logp), torch.zeros_like(r.old_logp)

    def actor_loss(model, r):
        if isinstance(r, dict):  # a PTX batch (right-padded): training.sft_nll
            _LEFT_PADDED[0] = False
            nll, _ = training.sft_nll(model, r, d.device)
            _LEFT_PADDED[0] = True
            return nll * 0.5
        logp, entropy = ppo_lag.logprobs(model, r.sequences, r.attention_mask, d, entropy=True)
        combined = ((r.reward_advantages - r.cost_advantages) / 2 if cfg.algo == "ppo_lag"
                    else r.reward_advantages)
        loss, _ = ppo_lag.actor_loss(logp.float(), r.old_logp, combined, r.action_mask, args.clip_eps)
        return loss.sum()

    def critic_loss(which):
        def fn(model, r):
            values = ppo_lag.values_of(model, r.sequences, r.attention_mask, d)
            loss, _ = ppo_lag.critic_loss(values, getattr(r, f"{which}_values"), getattr(r, f"{which}_returns"),
                                          r.action_mask, args.clip_range_value)
            return loss.sum()
        return fn

    actor_batches = list(rollouts)
    if cfg.ptx:
        ptx = {"input_ids": torch.zeros((b, L), dtype=torch.long), "attention_mask": torch.ones((b, L), dtype=torch.long),
               "loss_mask": torch.ones((b, L), dtype=torch.long)}
        actor_batches += [ptx] * chunks
    learn([("actor", "learning: actor", actor_loss, actor_batches)]
          + [(f"{w}_critic", f"learning: {w} critic", critic_loss(w), rollouts)
             for w in ("reward", "cost") if f"{w}_critic" in models])
    result["phases"] = tracker.phases
    result["seconds"] = time.time() - t0
    return result


# ----------------------------------------------------------------------------------------------
# Report


def static_table(cfg: PlanConfig) -> list[dict]:
    rows = []
    for name, head, trainable in cfg.model_specs():
        s = model_state_bytes(cfg.args, head, cfg.world, trainable=trainable, mixed_precision=cfg.mixed_precision)
        rows.append({"model": name, "head": head, "trainable": trainable, "offloaded": cfg.offloaded(trainable), **s})
    return rows


def verdict(peak: int, gpu_gib: float, frag: float, fixed_gib: float) -> dict:
    needed = peak * (1 + frag) + fixed_gib * GiB
    return {"peak": peak, "needed": needed, "capacity": gpu_gib * GiB, "fits": needed <= gpu_gib * GiB}


def summarize(cfg: PlanConfig, result: dict) -> dict:
    """The phases a reader needs: generation, scoring, learning (the max over the trained models'
    forward+backward and step) and, if simulated, learning with activation checkpointing flipped
    (its forward+backward; the step does not depend on it). Each: peak, breakdown, host peak."""
    phases = result["phases"]

    def view(name):
        rec = phases[name]
        return {"peak": rec["peak"], "breakdown": rec["breakdown"], "host_peak": rec["host_peak"]}

    out = {}
    if cfg.stage == "ppo":
        out["generation"], out["scoring"] = view("generation"), view("scoring")
    out["learning"] = view("learning")
    if "learning (AC flipped)" in phases:
        flipped = view("learning (AC flipped)")
        steps = [view(n) for n in phases if n.startswith("learning: ") and n.endswith(" step")]
        best = max([flipped] + steps, key=lambda v: v["peak"])
        out["learning, AC " + ("off" if cfg.activation_checkpointing else "on")] = {
            **best, "host_peak": max(v["host_peak"] for v in [flipped] + steps)}
    per_model, activations = {}, {}
    on_off = ("on", "off") if cfg.activation_checkpointing else ("off", "on")
    for n, rec in phases.items():
        if n.startswith("learning: ") and "(AC flipped)" not in n:
            who = n[len("learning: "):].rsplit(" ", 1)[0]
            per_model[who] = max(per_model.get(who, 0), rec["peak"])
        if n.startswith("learning: ") and " fwd+bwd" in n:
            who = n[len("learning: "):].split(" fwd+bwd")[0]
            setting = on_off[1] if n.endswith("(AC flipped)") else on_off[0]
            activations.setdefault(who, {})["AC " + setting] = rec["cat_peak"].get("activations", 0)
    return {"phases": out, "learning_per_model": per_model, "activations": activations}


def format_report(cfg: PlanConfig, result: dict, gpu_gib: float, frag: float, fixed_gib: float) -> str:
    a = cfg.args
    lines = []
    summary = summarize(cfg, result)
    biggest = max(v["peak"] for v in summary["phases"].values())
    unit, U = ("GiB", GiB) if biggest >= 4 * GiB else ("MiB", 2**20)
    shape = (f"dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} kv), hidden {a.hidden_dim}, "
             f"vocab {a.vocab_size}")
    what = (f"PPO ({cfg.algo}): {len(cfg.model_specs())} models" if cfg.stage == "ppo" else f"stage {cfg.stage}")
    seq = (f"{cfg.max_length} tokens ({cfg.max_length - cfg.max_new_tokens} prompt + {cfg.max_new_tokens} answer)"
           if cfg.stage == "ppo" else f"{cfg.max_length} tokens")
    lines.append(f"memory plan: {what}; {shape}")
    lines.append(f"  {cfg.world} GPUs, micro-batch {cfg.micro_batch} x {seq}"
                 + (f", {cfg.rollout_batch} prompts per iteration" if cfg.stage == "ppo" else "")
                 + f"; {'bf16 mixed precision' if cfg.mixed_precision else 'fp32'}; activation checkpointing "
                 + ("on" if cfg.activation_checkpointing else "off")
                 + ("; --offload-frozen" if cfg.offload_frozen else "") + ("; --cpu-offload" if cfg.cpu_offload else "")
                 + f"; kernels and AdamW as on {'CUDA' if cfg.device == 'cuda' else 'CPU'}")
    lines.append("")
    lines.append(f"per-rank state by model ({unit}; FSDP2 sharding arithmetic over the real Transformer's parameters)")
    lines.append(f"  {'model':<14} {'params':>10} {'dtype':>6} {'weights':>8} {'grads':>8} {'AdamW':>8}  where")
    total = defaultdict(int)
    movable = defaultdict(int)
    for row in static_table(cfg):
        dtype = "bf16" if cfg.mixed_precision and not row["trainable"] else "fp32"
        where = "host (offloaded)" if row["offloaded"] else "GPU"
        count = f"{row['numel'] / 1e6:.1f}M" if row["numel"] >= 1e5 else f"{row['numel'] / 1e3:.1f}k"
        lines.append(f"  {row['model']:<14} {count:>10} {dtype:>6} {row['params'] / U:8.2f} "
                     f"{row['grads'] / U:8.2f} {row['optimizer'] / U:8.2f}  {where}")
        for k in ("params", "grads", "optimizer"):
            total["host" if row["offloaded"] else "gpu"] += row[k]
            movable["--cpu-offload" if row["trainable"] else "--offload-frozen"] += row[k]
    lines.append(f"  on each GPU {total['gpu'] / U:.2f} {unit} (the gradients only while learning); "
                 f"in host memory {total['host'] / U:.2f} {unit} per rank")
    if cfg.stage == "ppo":
        lines.append(f"  --offload-frozen moves {movable['--offload-frozen'] / U:.2f} {unit} per GPU to the host, "
                     f"--cpu-offload {movable['--cpu-offload'] / U:.2f} {unit} (shards, gradients, AdamW state)")
    lines.append("")

    phases = summary["phases"]
    cols = list(phases)
    width = max(14, max(len(c) for c in cols) + 2)
    lines.append(f"peak per phase on one GPU ({unit}; live tensor bytes at the phase's peak, by what allocated them)")
    lines.append(f"  {'':<60}" + "".join(f"{c:>{width}}" for c in cols))
    for key, label in CATEGORIES:
        values = [phases[c]["breakdown"].get(key, 0) for c in cols]
        if all(abs(v) < 0.005 * U for v in values):
            continue
        lines.append(f"  {label:<60}" + "".join(f"{v / U:>{width}.2f}" for v in values))
    lines.append(f"  {'total (peak allocated)':<60}" + "".join(f"{phases[c]['peak'] / U:>{width}.2f}" for c in cols))
    if any(phases[c]["host_peak"] for c in cols):
        lines.append(f"  {'host memory (offloaded shards, grads, AdamW state)':<60}"
                     + "".join(f"{phases[c]['host_peak'] / U:>{width}.2f}" for c in cols))
    if len(summary["learning_per_model"]) > 1:
        lines.append("  learning peak per trained model: " + ", ".join(
            f"{who} {peak / U:.2f}" for who, peak in summary["learning_per_model"].items()) + f" {unit}")
    lines.append(f"  activations (the most live during a forward+backward, {unit}): " + "; ".join(
        f"{who} " + ", ".join(f"{acts[k] / U:.2f} with {k}" for k in ("AC on", "AC off") if k in acts)
        for who, acts in summary["activations"].items()))
    if cfg.stage == "ppo":
        gen = result["phases"]["generation"]["cat_peak"]
        logprob = max(rec["cat_peak"].get("logprob", 0) for n, rec in result["phases"].items()
                      if n == "scoring" or n.startswith("learning"))
        lines.append(f"  generation holds the gathered actor ({gen.get('gathered', 0) / U:.2f} {unit}) and the KV cache "
                     f"({gen.get('kv_cache', 0) / U:.2f} {unit}); log-prob/logit buffers peak at {logprob / U:.2f} {unit}")
    lines.append("")
    main = [c for c in cols if not c.startswith("learning, AC")]
    peak_phase = max(main, key=lambda c: phases[c]["peak"])
    v = verdict(phases[peak_phase]["peak"], gpu_gib, frag, fixed_gib)
    lines.append(f"peak phase: {peak_phase} ({v['peak'] / GiB:.2f} GiB allocated per GPU)")
    lines.append(f"margin: +{frag:.0%} of the peak for allocator fragmentation/caching, +{fixed_gib:g} GiB for the CUDA "
                 f"context and NCCL buffers: {v['needed'] / GiB:.2f} GiB needed of {gpu_gib:g} GiB")
    other = [c for c in cols if c.startswith("learning, AC")]
    if other:
        alt = max([phases[c]["peak"] for c in main if c != "learning"] + [phases[other[0]]["peak"]])
        w = verdict(alt, gpu_gib, frag, fixed_gib)
        lines.append(f"  with activation checkpointing {'off' if cfg.activation_checkpointing else 'on'}: peak "
                     f"{alt / GiB:.2f} GiB, {w['needed'] / GiB:.2f} GiB needed: {'fits' if w['fits'] else 'does not fit'}")
    lines.append(f"verdict: {'FITS' if v['fits'] else 'DOES NOT FIT'} on {cfg.world} x {gpu_gib:g} GiB "
                 f"(headroom {(v['capacity'] - v['needed']) / GiB:+.2f} GiB per GPU)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default=None, help=f"model shape: {', '.join(PRESETS)} (default llama-7b unless a shape is given)")
    a("--dim", type=int)
    a("--layers", type=int)
    a("--heads", type=int)
    a("--kv-heads", type=int)
    a("--vocab", type=int)
    a("--hidden", type=int)
    a("--tie-embeddings", action="store_true", default=None)
    a("--gpus", type=int, default=8, help="ranks (FSDP world size)")
    a("--stage", choices=["ppo", "sft", "score"], default="ppo")
    a("--algo", choices=["ppo_lag", "ppo", "reward_shaping"], default="ppo_lag",
      help="ppo_lag: 6 models; reward_shaping: no cost critic (5); ppo: no cost model nor cost critic (4)")
    a("--micro-batch", type=int, default=16, help="sequences per forward per rank (score stage: pairs, 2x sequences)")
    a("--max-length", type=int, default=512, help="tokens per sequence (PPO: prompt + answer)")
    a("--max-new-tokens", type=int, default=None, help="PPO answer tokens (default max-length / 2)")
    a("--rollout-batch", type=int, default=None, help="PPO prompts per iteration, all ranks (default micro-batch x gpus)")
    a("--precision", choices=["bf16", "fp32"], default="bf16")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    a("--offload-frozen", action="store_true", help="frozen models' shards in host memory (ppo_lag.py --offload-frozen)")
    a("--cpu-offload", action="store_true", help="trained models' shards, grads, AdamW state in host memory")
    a("--ptx", action="store_true", help="PPO: add the PTX (SFT) micro-batches to the actor update")
    a("--device", choices=["cuda", "cpu"], default="cuda",
      help="cuda: Triton kernels and foreach AdamW (GPU runs); cpu: PyTorch kernel paths (what runs on CPU)")
    a("--gpu-gb", type=float, default=80.0, help="GPU memory, GiB")
    a("--frag-margin", type=float, default=0.10, help="margin for allocator fragmentation/caching, fraction of the peak")
    a("--fixed-margin-gb", type=float, default=2.0, help="margin for CUDA context and NCCL buffers, GiB")
    a("--decode-steps", type=int, default=2, help="generation steps replayed (memory is flat after the first)")
    a("--no-flip", action="store_true", help="skip the learning phase with activation checkpointing flipped")
    a("--json", default=None, help="also write the plan as JSON here")
    return p.parse_args(argv)


def model_args(ns) -> ModelArgs:
    shape = {"dim": ns.dim, "n_layers": ns.layers, "n_heads": ns.heads, "n_kv_heads": ns.kv_heads,
             "vocab_size": ns.vocab, "hidden_dim": ns.hidden, "tie_embeddings": ns.tie_embeddings}
    shape = {k: v for k, v in shape.items() if v is not None}
    preset = ns.preset or ("llama-7b" if not shape else None)
    if preset is not None:
        return ModelArgs.from_name(preset, **shape)
    return ModelArgs(**shape)


def config_from(ns) -> PlanConfig:
    return PlanConfig(args=model_args(ns), world=ns.gpus, stage=ns.stage, algo=ns.algo, micro_batch=ns.micro_batch,
                      max_length=ns.max_length, max_new_tokens=ns.max_new_tokens, rollout_batch=ns.rollout_batch,
                      precision=ns.precision, activation_checkpointing=ns.activation_checkpointing,
                      offload_frozen=ns.offload_frozen, cpu_offload=ns.cpu_offload, ptx=ns.ptx, device=ns.device,
                      decode_steps=ns.decode_steps, other_ac=not ns.no_flip)


def plan(cfg: PlanConfig) -> dict:
    result = simulate(cfg)
    result["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "args"}
    result["config"]["args"] = dataclasses.asdict(cfg.args)
    result["static"] = static_table(cfg)
    result["summary"] = summarize(cfg, result)
    return result


def main(argv=None):
    ns = parse_args(argv)
    cfg = config_from(ns)
    result = plan(cfg)
    print(format_report(cfg, result, ns.gpu_gb, ns.frag_margin, ns.fixed_margin_gb))
    print(f"(simulated in {result['seconds']:.1f} s on fake tensors)")
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
