"""Per-GPU memory plan of PPO's six models (and of the single-model stages): the real code, run on fake tensors.

    python bench/memory_plan.py --preset llama-3-8b --gpus 8 --algo ppo_lag --micro-batch 16 --max-length 512
    python bench/memory_plan.py --preset llama-7b --gpus 8 --offload-frozen --gpu-gb 80
    python bench/memory_plan.py --dim 512 --layers 8 --heads 8 --kv-heads 4 --vocab 32000 --hidden 1408 \
        --gpus 2 --micro-batch 4 --max-length 128 --precision fp32 --device cpu     # what bench/measure_memory.py checks
    python bench/memory_plan.py --preset llama-7b --gpus 8 --stage sft --micro-batch 4

How the figures are obtained (nothing below is a hand formula for the total, nor a copy of the code):

* One PPO iteration is ppo_lag.py's own: `ppo_lag.load_models` builds the six models and their
  optimizers, `ppo_lag.rollout` generates (`Transformer.generate` inside `training.gathered`) and
  scores, `ppo_lag.make_multiplier` gives lambda, `ppo_lag.advantages` and `ppo_lag.ppo_update`
  (`training.train_step` of the actor and each critic: forward, backward, gradient clipping, AdamW)
  learn. --stage sft / score: one `training.train_step` on the SFT loss / train_score.py's reward loss.
  It runs on a *fake* process group of `--gpus` ranks (torch.testing's "fake" backend: one process
  plays rank 0, collectives do nothing) with every tensor a FakeTensor (torch's FakeTensorMode:
  shapes, dtypes and storage sizes, no data). Models are built as `training.load_model` builds them,
  minus reading weights (`weightless_loading`: meta device, the real `training.shard`, FSDP2 per block
  then the root, frozen models in bf16 under mixed precision). The AdamW state exists (one step on
  zero gradients creates it first: the steady state of every iteration after the first).
* A TorchDispatchMode (`LiveMemory`) records every tensor storage as it is created (and FSDP2's
  storage resizes), with the place in the code that allocated it, and frees it when the storage dies:
  the live bytes at every moment, their peak per phase, and what the peak is made of. Phases are
  marked by wrapping the training helpers the real code calls (`Phases.instrument`: generation is
  `training.gathered`, learning each `training.train_step`, split at its `clip_grad_norm`). The same
  accounting and the same phase marks run on real tensors in bench/measure_memory.py, beside an
  allocator-level measurement (bench/validate_memory_plan.py compares the two; bench/RESULTS.md).
* The host syncs of the real code (`.item()`, `bool()`, `.tolist()`, `nonzero()`: the prompt-padding
  checks, `positions_from_mask`, the attention masks' row checks, rollout's trimming of padding
  columns, the log-prob chunks' target rows, batches_for_step's permutation) get real answers: a
  second TorchDispatchMode (`KnownValues`) keeps the real values of every integer and boolean tensor
  (token ids, masks, positions) and scalar beside the fake ones. The data are stand-ins
  (`stand_in_prompts`, `stand_in_tokenizer`; the same as bench/measure_memory.py's): left-padded
  prompts, the longest at full length; the policy's sampled token is never EOS, so every answer runs
  to --max-new-tokens (the worst case). Logged floats (losses, the gradient norm) read 0.0.
* Two things fake tensors cannot do are stood in for: Triton kernels cannot launch (with
  `--device cuda`, the default, attention and log-probs take their Triton paths, whose host code
  allocates the real buffers, flash attention's out/lse/delta/dq/dk/dv and the fused log-prob's
  partials and [N, C] gradient chunk, with every launch skipped; AdamW uses its CUDA default,
  foreach; `--device cpu` keeps the PyTorch kernel paths and the single-tensor AdamW of CPUs); and a
  decoding step of an 8B model takes about half a second, so `generate` decodes `--decode-steps`
  tokens (its KV cache allocated at the full answer length: memory is flat after the first step).

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
import random
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._guards import active_fake_mode  # noqa: E402
from torch._subclasses.fake_tensor import (  # noqa: E402
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten  # noqa: E402

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
        elif path.endswith("rlhf_kernels/logprob.py"):
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
        if any(issubclass(t, DTensor) for t in types):
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
# Known values: the integer data of a fake run


TRACKED_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64)
KNOWN_LIMIT_BYTES = 256 * 2**20  # a larger integer tensor (none in this code) stays unknown


class KnownValues(TorchDispatchMode):
    """The values of a fake run's integer and boolean tensors (token ids, masks, positions, indices)
    and of its scalars, kept as real tensors beside the fake ones: the host syncs of the real code
    (`.item()`, `bool()`, `.tolist()`, `nonzero()`) get the answers the real data gives.

    Every op runs on fake tensors first. When it produces or writes such a tensor and every tensor it
    reads is known, it runs again on the real values (a view shares its base's real storage, so
    in-place writes through views land there too). What depends on floating-point data (activations,
    logits, losses) is unknown, except the sampler's choice: an integer picked from floats (argmax,
    multinomial) is `sampled_token`, a non-EOS token, so no answer stops early. An op the fake mode
    cannot size or answer (data-dependent output) is answered from the known values; a host read of
    an unknown float (a loss or norm that is only logged) reads 0.0; an unknown integer or boolean read
    is an error naming the line, so a new data-dependent decision in the real code cannot pass unseen."""

    SAMPLERS = ("aten::argmax", "aten::argmin", "aten::multinomial")

    def __init__(self, fake_mode, sampled_token: int):
        super().__init__()
        self.fake_mode, self.sampled_token = fake_mode, sampled_token
        self.storages: dict[int, tuple] = {}  # id(fake storage) -> (weakref to it, real UntypedStorage)
        self.float_reads = 0
        self._writes: dict = {}

    def _storage(self, t):
        st = t.untyped_storage()
        entry = self.storages.get(id(st))
        return entry[1] if entry is not None and entry[0]() is st else None

    def value(self, t):
        """The real tensor behind a fake one (None if unknown); a real tensor is its own value."""
        if not isinstance(t, FakeTensor):
            return t
        storage = self._storage(t)
        if storage is None:
            return None
        with unset_fake_temporarily():
            return torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())

    def remember(self, fake, real):
        st = fake.untyped_storage()
        if self._storage(fake) is not None or st.nbytes() > KNOWN_LIMIT_BYTES:
            return
        with unset_fake_temporarily():
            if (real.untyped_storage().nbytes() == st.nbytes() and real.storage_offset() == fake.storage_offset()
                    and real.stride() == fake.stride()):
                storage = real.untyped_storage()
            else:
                storage = torch.UntypedStorage(st.nbytes())
                torch.empty(0, dtype=fake.dtype).set_(storage, fake.storage_offset(), fake.shape,
                                                      fake.stride()).copy_(real)
        key = id(st)
        self.storages[key] = (weakref.ref(st, lambda r, k=key: self._dead(k, r)), storage)

    def _dead(self, key, ref):
        entry = self.storages.get(key)
        if entry is not None and entry[0] is ref:
            del self.storages[key]

    def forget(self, fake):
        self.storages.pop(id(fake.untyped_storage()), None)

    @staticmethod
    def _tracked(t) -> bool:
        return isinstance(t, FakeTensor) and t.device.type != "meta" and (t.dtype in TRACKED_DTYPES or t.numel() <= 1)

    @staticmethod
    def _written(writes, args, kwargs) -> list:
        """The tensors an op writes in place (self of add_, out=...): writes lists their arguments."""
        out = []
        for i, name in writes:
            out += tree_leaves(args[i] if i < len(args) else kwargs.get(name))
        return [t for t in out if isinstance(t, torch.Tensor)]

    def _real(self, args, kwargs):
        """(args, kwargs) with every tensor replaced by its value, or None if one is unknown."""
        leaves, spec = tree_flatten((args, kwargs))
        values = []
        for x in leaves:
            v = self.value(x) if isinstance(x, torch.Tensor) else x
            if v is None:
                return None
            values.append(v)
        return tree_unflatten(values, spec)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as error:
            return self._data_dependent(func, args, kwargs, error)
        writes = self._writes.get(func)
        if writes is None:
            writes = self._writes[func] = [(i, a.name) for i, a in enumerate(func._schema.arguments)
                                           if a.alias_info is not None and a.alias_info.is_write]
        if not writes and isinstance(out, torch.Tensor) and not self._tracked(out):
            return out  # the common case: a fresh floating-point tensor
        outs = [t for t in tree_leaves(out) if self._tracked(t)]
        written = [t for t in self._written(writes, args, kwargs) if self._tracked(t)]
        if not outs and not written:
            return out
        real = self._real(args, kwargs)
        if real is not None:
            try:
                with unset_fake_temporarily():
                    real_out = func(*real[0], **real[1])
            except Exception:  # an op that runs only on fake tensors here: its results stay unknown
                real = None
        if real is not None:
            for fake, value in zip(tree_leaves(out), tree_leaves(real_out)):
                if self._tracked(fake) and isinstance(value, torch.Tensor):
                    self.remember(fake, value)
        elif func.name() in self.SAMPLERS and not written:
            for fake in outs:
                with unset_fake_temporarily():
                    self.remember(fake, torch.full(fake.shape, self.sampled_token, dtype=fake.dtype))
        else:
            for t in written:
                self.forget(t)
        return out

    def _data_dependent(self, func, args, kwargs, error):
        real = self._real(args, kwargs)
        if real is not None:
            with unset_fake_temporarily():
                value = func(*real[0], **real[1])

            def fake(v):
                if not isinstance(v, torch.Tensor):
                    return v
                f = self.fake_mode.from_tensor(v)
                self.remember(f, v)
                return f

            return tree_map(fake, value)
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_floating_point():
            self.float_reads += 1
            return 0.0
        raise RuntimeError(f"memory plan: {func} needs tensor values the fake run does not know, at "
                           f"{_caller()} (teach bench/memory_plan.py's KnownValues the answer)") from error


def _caller() -> str:
    """file:line of the innermost frame of this project's code outside bench/memory_plan.py."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(str(ROOT)) and not path.endswith("memory_plan.py") and "/.venv/" not in path:
            return f"{Path(path).relative_to(ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "(unknown)"


# ----------------------------------------------------------------------------------------------
# Stand-ins for the data, shared with bench/measure_memory.py

PAD_ID, EOS_ID, SAMPLED_TOKEN = 0, 1, 2
STEP = 2  # the iteration simulated (and measured): the second, when the AdamW state exists


def stand_in_tokenizer(vocab_size: int):
    """What ppo_lag reads of a Tokenizer: pad 0, one EOS id 1 (the policy's token 2 is neither)."""
    return SimpleNamespace(pad_id=PAD_ID, eos_id=EOS_ID, eos_ids=(EOS_ID,), bos_id=None, vocab_size=vocab_size,
                           path="(stand-in tokenizer)")


def stand_in_prompts(n: int, length: int, vocab: int, micro_batch: int, world: int, step: int,
                     seed: int = 0) -> list[list[int]]:
    """n prompts of 1/2..1 x length tokens (ids 3..vocab-1: never pad, EOS nor the plan's sampled
    token), the one that training.batches_for_step puts first in each micro-batch of iteration `step`
    (data seed `seed`) at full length: every rank's left-padded batch is [micro-batch, length], and
    has left padding (the attention's key masks exist)."""
    import training

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(max(1, length // 2), length))] for _ in range(n)]
    for rank in range(world):
        for batch in training.batches_for_step(step - 1, n, n, micro_batch, SimpleNamespace(rank=rank, world=world),
                                               seed):
            prompts[batch[0]] += [rng.randrange(3, vocab) for _ in range(length - len(prompts[batch[0]]))]
    return prompts


def stand_in_sft(n: int, length: int, prompt_length: int, vocab: int, seed: int = 1) -> list:
    """n SFT dialogues (the PTX data) of `length` tokens, the response after `prompt_length`."""
    from data.loaders import TokenizedSFT

    rng = random.Random(seed)
    return [TokenizedSFT([rng.randrange(3, vocab) for _ in range(length)], prompt_length) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Phases: marked inside the real code by wrapping the training helpers it calls

MARK = "memplan::"  # profiler ranges of the phases (bench/measure_memory.py)


class Phases:
    """Phase windows of one iteration, on a LiveMemory (and, with markers=True, as profiler ranges
    named "memplan::<phase>" for bench/measure_memory.py's allocator measurement).

    `instrument(names)` wraps, for its duration, the helpers ppo_lag.py, sft.py and train_score.py
    call: training.gathered (the window is "generation"; "scoring" begins when it exits and ends when
    the caller says), training.train_step ("learning: <name> fwd+bwd" up to clip_grad_norm, then
    "learning: <name> step"), each name followed by `suffix`; after each loss the gradients of the
    unsharded parameters are tagged (tag_unsharded_grads). Nothing is recorded while `on` is False.
    offloaded(model): its reduced gradient shards (and its optimizer step) live in host memory."""

    def __init__(self, tracker: LiveMemory, markers: bool = False, offloaded=lambda model: False):
        self.tracker, self.markers, self.offloaded = tracker, markers, offloaded
        self.on, self.suffix, self.open = True, "", []

    def begin(self, name: str, *contexts):
        if not self.on:
            return
        name += self.suffix
        stack = contextlib.ExitStack()
        if self.markers:
            from torch.profiler import record_function

            stack.enter_context(record_function(MARK + name))
        stack.enter_context(self.tracker.phase(name))
        for c in contexts:
            stack.enter_context(c)
        self.open.append((name, stack))

    def end(self, name: str):
        if not self.on:
            return
        top, stack = self.open.pop()
        assert top == name + self.suffix, (top, name)
        stack.close()

    @contextlib.contextmanager
    def instrument(self, names: dict):
        """names: id(trained model) -> its name in the phases ("actor", "reward critic", ...)."""
        import training

        gathered, train_step, clip = training.gathered, training.train_step, training.clip_grad_norm
        current = []

        @contextlib.contextmanager
        def gathered_phase(model):
            self.begin("generation")
            with gathered(model) as m:
                yield m
            self.end("generation")
            self.begin("scoring")

        def clip_phase(model, max_norm):
            self.end(current[-1] + " fwd+bwd")
            host = self.tracker.host() if self.offloaded(model) else contextlib.nullcontext()
            self.begin(current[-1] + " step", host)
            return clip(model, max_norm)

        def train_step_phases(model, optimizer, scheduler, micro_batches, loss_fn, *args, **kwargs):
            def loss_then_tag(batch):
                out = loss_fn(batch)
                tag_unsharded_grads(model, self.tracker)  # the forward has created the unsharded parameters
                return out

            current.append("learning: " + names[id(model)])
            grads = self.tracker.host_categories("grads") if self.offloaded(model) else contextlib.nullcontext()
            self.begin(current[-1] + " fwd+bwd", grads)
            out = train_step(model, optimizer, scheduler, micro_batches, loss_then_tag, *args, **kwargs)
            self.end(current.pop() + " step")
            return out

        training.gathered, training.train_step, training.clip_grad_norm = gathered_phase, train_step_phases, clip_phase
        try:
            yield self
        finally:
            training.gathered, training.train_step, training.clip_grad_norm = gathered, train_step, clip



# ----------------------------------------------------------------------------------------------
# What fake tensors cannot do: launch a kernel, and decode hundreds of tokens quickly

H100_SMS = 132


@contextlib.contextmanager
def kernel_launches_skipped(device: str):
    """With device 'cuda': attention and log-probs take their Triton paths (`rlhf_kernels.use_triton`
    is True), whose host code allocates the real buffers, and every Triton launch does nothing
    (fake tensors have no data); the fused log-prob's vocabulary split counts an H100's SMs."""
    if device != "cuda":
        yield
        return
    import rlhf_kernels
    import rlhf_kernels.logprob as logprob

    if not rlhf_kernels.TRITON_AVAILABLE:
        raise RuntimeError("--device cuda replays the Triton kernels' allocations: install triton (requirements.txt)")
    from triton.runtime.jit import KernelInterface

    saved = [(rlhf_kernels, "use_triton"), (KernelInterface, "__getitem__"), (logprob, "_num_vocab_splits")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in saved]
    rlhf_kernels.use_triton = lambda tensor: True
    KernelInterface.__getitem__ = lambda kernel, grid: (lambda *args, **kwargs: None)
    logprob._num_vocab_splits = lambda rows, device: max(1, min(32, -(-4 * H100_SMS // -(-rows // 128))))
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@contextlib.contextmanager
def decode_steps_capped(actor, steps: int):
    """actor.generate (the real one, FSDP's root hooks included) decodes at most `steps` tokens per
    call, with its KV cache allocated at the length of the whole answer; the tokens not decoded are
    the sampled token too. After the first token a decoding step frees everything it allocates (the
    output and the cache are preallocated), so more steps would not change the peak, and a step on
    fake tensors of an 8B model takes about half a second."""
    import model as model_module

    generate, full_cache = actor.generate, model_module.KVCache

    def capped(input_ids, attention_mask=None, max_new_tokens: int = 32, **kwargs):
        n = min(steps, max_new_tokens)

        class FullLengthCache(full_cache):
            def __init__(self, batch, max_len, *args, **kw):
                super().__init__(batch, max_len + max_new_tokens - n, *args, **kw)

        model_module.KVCache = FullLengthCache
        try:
            out = generate(input_ids, attention_mask, max_new_tokens=n, **kwargs)
        finally:
            model_module.KVCache = full_cache
        rest = torch.full((out.shape[0], max_new_tokens - n), SAMPLED_TOKEN, dtype=out.dtype, device=out.device)
        return torch.cat([out, rest], 1)

    actor.generate = capped
    try:
        yield
    finally:
        actor.generate = generate


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


@contextlib.contextmanager
def weightless_loading(cfg: PlanConfig, tracker: LiveMemory):
    """training.load_model minus reading weights, for the duration: built on the meta device in its
    dtype (fp32; frozen models bf16 under mixed precision), sharded by the real training.shard,
    materialised as fake tensors (in host memory when offloaded), flagged as load_model flags it."""
    import training

    load_model = training.load_model

    def load(spec, head, d, *, activation_checkpointing=False, cpu_offload=False, trainable=True, **_):
        dtype = torch.bfloat16 if d.mixed_precision and not trainable else torch.float32
        with unset_fake_temporarily(), torch.device("meta"):
            model = Transformer(cfg.args, head=head).to(dtype)
            training.shard(model, d, cpu_offload=False, frozen=not trainable)
        with tracker.host() if cpu_offload else contextlib.nullcontext():
            model.to_empty(device="cpu")
        model.score_stats, model.source_dtype = None, dtype
        model.activation_checkpointing = activation_checkpointing
        model.requires_grad_(trainable)
        if not trainable:
            model.eval()
        return model

    training.load_model = load
    try:
        yield
    finally:
        training.load_model = load_model


def create_optimizer_state(optimizers: dict, models: dict, cfg: PlanConfig, tracker: LiveMemory):
    """The steady state (the second iteration on): AdamW's state exists. One step on zero gradients
    creates it, through the optimizer's own code."""
    for name, (optimizer, _) in optimizers.items():
        if cfg.device == "cuda":
            for group in optimizer.param_groups:
                group["foreach"] = True  # torch's default for CUDA tensors
        with tracker.host() if cfg.cpu_offload else contextlib.nullcontext():
            for p in models[name].parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def ppo_args(cfg: PlanConfig):
    """ppo_lag's own arguments for this configuration."""
    import ppo_lag

    return ppo_lag.parse_args([
        "--algo", cfg.algo, "--actor", "(plan)", "--reward-model", "(plan)",
        "--cost-model", "none" if cfg.algo == "ppo" else "(plan)",
        "--batch-size", str(cfg.rollout_batch), "--micro-batch-size", str(cfg.micro_batch),
        "--max-length", str(cfg.max_length - cfg.max_new_tokens), "--max-new-tokens", str(cfg.max_new_tokens),
        "--precision", cfg.precision, "--device", "cpu", "--ptx-coeff", "1" if cfg.ptx else "0", "--threshold", "0",
        "--activation-checkpointing" if cfg.activation_checkpointing else "--no-activation-checkpointing",
        *(["--offload-frozen"] if cfg.offload_frozen else []), *(["--cpu-offload"] if cfg.cpu_offload else []),
        "--out", "out/memory_plan_unused"])


def ppo_iteration(step: int, models, prompts, ptx, lam: float, args, d, tok, phases: Phases) -> list:
    """ppo_lag.main's iteration with lambda given (its update reads the costs, which fake tensors do
    not have, and changes no tensor): rollout (phases generation, scoring), advantages, ppo_update
    (phase learning). The plan and bench/measure_memory.py both run this."""
    import ppo_lag

    rollouts, _ = ppo_lag.rollout(step, models, prompts, args, d, tok)
    phases.end("scoring")
    ppo_lag.advantages(rollouts, lam, args)
    learn(step, rollouts, models, ptx, lam, args, d, tok, phases)
    return rollouts


def learn(step: int, rollouts: list, models, ptx, lam: float, args, d, tok, phases: Phases):
    import ppo_lag

    phases.begin("learning")
    ppo_lag.ppo_update(step, rollouts, models, ptx, lam, args, d, tok)
    phases.end("learning")


def run_ppo(cfg: PlanConfig, d, tracker: LiveMemory, result: dict):
    """One PPO iteration through ppo_lag's own functions: load_models, rollout (generation, scoring),
    the Lagrange multiplier's lambda, advantages, ppo_update; then ppo_update again with activation
    checkpointing flipped."""
    import ppo_lag

    args = ppo_args(cfg)
    tok = stand_in_tokenizer(cfg.args.vocab_size)
    with tracker.phase("setup"), weightless_loading(cfg, tracker):
        models = ppo_lag.load_models(args, d, tok, total_steps=1)
    trained = {name: getattr(models, name) for name in models.optimizers}
    with tracker.phase("optimizer state"):
        create_optimizer_state(models.optimizers, trained, cfg, tracker)
    result["resident"] = tracker.snapshot()
    result["models"] = {name: {"head": head, "trainable": t, "offloaded": cfg.offloaded(t)}
                        for name, head, t in cfg.model_specs()}

    prompt_length = cfg.max_length - cfg.max_new_tokens
    with unset_fake_temporarily():
        prompts = stand_in_prompts(cfg.rollout_batch, prompt_length, cfg.args.vocab_size, cfg.micro_batch, cfg.world,
                                   STEP, args.seed)
    ptx = stand_in_sft(cfg.rollout_batch, cfg.max_length, prompt_length, cfg.args.vocab_size) if cfg.ptx else None
    lam = ppo_lag.make_multiplier(args, d).value
    phases = Phases(tracker, offloaded=lambda model: cfg.cpu_offload)
    names = {id(model): name.replace("_", " ") for name, model in trained.items()}
    with phases.instrument(names), decode_steps_capped(models.actor, cfg.decode_steps):
        rollouts = ppo_iteration(STEP, models, prompts, ptx, lam, args, d, tok, phases)
        if cfg.other_ac:  # learning again, with activation checkpointing flipped
            for model in trained.values():
                model.activation_checkpointing = not cfg.activation_checkpointing
            phases.suffix = " (AC flipped)"
            learn(STEP, rollouts, models, ptx, lam, args, d, tok, phases)
    result["rollout_width"] = rollouts[0].sequences.shape[1]


def run_stage(cfg: PlanConfig, d, tracker: LiveMemory, result: dict):
    """One optimiser step of sft.py (SFT loss on right-padded dialogues) or train_score.py (the reward
    ranking loss on [2B, L] pairs), through training.train_step."""
    import training
    from data.loaders import TokenizedRewardPair, collate_reward_pairs, collate_sft

    head = "lm" if cfg.stage == "sft" else "score"
    with tracker.phase("setup"), weightless_loading(cfg, tracker):
        model = training.load_model("(plan)", head, d, activation_checkpointing=cfg.activation_checkpointing,
                                    cpu_offload=cfg.cpu_offload)
    optimizers = {"model": training.build_optimizer(model, 1e-5, 0.01)}
    with tracker.phase("optimizer state"):
        create_optimizer_state(optimizers, {"model": model}, cfg, tracker)
    result["resident"] = tracker.snapshot()
    result["models"] = {"model": {"head": head, "trainable": True, "offloaded": cfg.cpu_offload}}
    b, L, vocab = cfg.micro_batch, cfg.max_length, cfg.args.vocab_size
    if cfg.stage == "sft":
        batch = collate_sft(stand_in_sft(b, L, L // 2, vocab), PAD_ID)

        def loss_fn(batch):
            with training.autocast(d):
                return training.sft_nll(model, batch, d.device)[0], {}
    else:
        import train_score

        texts = stand_in_sft(2 * b, L, 0, vocab)
        batch = collate_reward_pairs([TokenizedRewardPair(texts[2 * i].input_ids, texts[2 * i + 1].input_ids)
                                      for i in range(b)], PAD_ID)
        objective = train_score.OBJECTIVES["reward"]

        def loss_fn(batch):
            first, second = train_score.scores_of(model, objective, batch, d)
            return objective.loss(first, second, batch, 0.0), {}

    phases = Phases(tracker, offloaded=lambda m: cfg.cpu_offload)
    with phases.instrument({id(model): cfg.stage}):
        for flipped in [False] + ([True] if cfg.other_ac else []):
            model.activation_checkpointing = cfg.activation_checkpointing != flipped
            phases.suffix = " (AC flipped)" if flipped else ""
            phases.begin("learning")
            training.train_step(model, *optimizers["model"], [batch], loss_fn, b, d, 1.0)
            phases.end("learning")


def simulate(cfg: PlanConfig) -> dict:
    """Run one steady-state iteration of the real code on fake tensors; return the per-phase peaks
    and breakdowns."""
    import training

    t0 = time.time()
    tracker = LiveMemory()
    result = {"phases": {}, "models": {}}
    with fake_world(cfg.world) as mesh:
        d = training.Dist(0, cfg.world, 0, torch.device("cpu"), mesh, cfg.mixed_precision)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        known = KnownValues(fake_mode, SAMPLED_TOKEN)
        with fake_mode, kernel_launches_skipped(cfg.device), known, tracker:
            (run_ppo if cfg.stage == "ppo" else run_stage)(cfg, d, tracker, result)
    result["phases"] = tracker.phases
    result["float_reads"] = known.float_reads
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
    forward+backward and step) and, if simulated, learning with activation checkpointing flipped.
    Each: peak, breakdown, host peak."""
    phases = result["phases"]

    def view(name):
        rec = phases[name]
        return {"peak": rec["peak"], "breakdown": rec["breakdown"], "host_peak": rec["host_peak"]}

    out = {}
    if cfg.stage == "ppo":
        out["generation"], out["scoring"] = view("generation"), view("scoring")
    out["learning"] = view("learning")
    if "learning (AC flipped)" in phases:
        out["learning, AC " + ("off" if cfg.activation_checkpointing else "on")] = view("learning (AC flipped)")
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
    a("--decode-steps", type=int, default=2, help="tokens generate() decodes per call (memory is flat after the first)")
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
