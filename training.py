"""What sft.py, train_score.py and ppo_lag.py share, written once.

    d = setup_distributed(device, precision)    rank, world, device, bf16 or not; a gloo or nccl mesh
    model = load_model(spec, head, d, ...)      meta init, FSDP2 per block then the root, weights in
    opt, sched = build_optimizer(...)           AdamW (no decay on norms/biases) + cosine with warmup
    train_step(model, opt, sched, batches, ...) one optimiser step over this rank's micro-batches
    for step in ...: batches_for_step(...)      deterministic global batches, split across ranks
    log = Logger(...)                           <out>/log.jsonl, one object per step, a progress bar, and the
                                                trackers of --report-to (TensorBoard, wandb)

The command line (flags, recipes, user errors) is cli.py's, checkpoints are checkpoint.py's, Hugging
Face-format models hf_io.py's, atomic files and JSON lines fileio.py's.

Launched with torchrun, every function here is collective-safe (all ranks call it). Launched as
one plain process there is no process group at all and the model is a plain module: that run is
the reference the distributed one is tested against.

Reproducibility is by construction: the data a step sees depends only on (seed, step), so resuming
means restoring weights, optimiser, schedule, step and RNG, nothing else.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cli
import fileio
import hf_io
from data.loaders import split_train_eval
from data.tokenizer import Tokenizer, find_tokenizer_file
from model import PRESETS, Transformer

# ----------------------------------------------------------------------------------------------
# Data and tokenizer


def load_tokenizer(args, model_path: str, synthetic_tokenizer, d: "Dist", *other_models) -> Tokenizer:
    """--tokenizer (a tokenizer.json / tokenizer.model, or a directory), else the one beside the
    model, else the synthetic task's, as --template uses it (Tokenizer.for_template: the chat template
    needs one and ends a response at its end of turn); the templates model_path and other_models were
    trained with must be --template (None: the one they recorded, as the stages resolve it first)."""
    args.template = resolve_template(args.template, model_path, *other_models)
    if not Path(model_path).is_dir() and model_path not in PRESETS:
        raise FileNotFoundError(f"{model_path}: no such checkpoint directory (nor a preset: {', '.join(PRESETS)})")
    if args.tokenizer is not None:
        path = find_tokenizer_file(args.tokenizer)
    elif Path(model_path).is_dir() and any((Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        path = find_tokenizer_file(model_path)
    elif synthetic_tokenizer is not None:
        path = Path(synthetic_tokenizer)
    else:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {model_path}; pass --tokenizer")
    tok = Tokenizer(path).for_template(args.template)
    d.print(f"tokenizer: {tok.describe()}; template {args.template}")
    check_same_tokenizer(tok, model_path, *other_models)
    return tok


# Words, digits, punctuation, accents, CJK, an emoji, code and whitespace: two tokenizers that give it the same
# ids share a vocabulary (Llama-3.0 and 3.1, Qwen2.5 base and instruct); any two families differ on it.
TOKENIZER_PROBE = "Hello, world! How do I bake bread? It's 1,234.5 degrees; naïve café, 你好 🙂\n\tdef f(x): return x**2"


def check_same_tokenizer(tok: Tokenizer, *checkpoints):
    """Every model of a run reads the ids of one tokenizer, `tok`: a checkpoint folder whose own tokenizer
    file encodes TOKENIZER_PROBE to other ids was trained on another vocabulary (a Qwen reward model
    beside a Llama policy), and would score or continue ids it never saw without any error when its
    embedding is large enough. Presets, folders without a tokenizer file and ones whose tokenizer cannot
    be loaded are not compared (the model's own loading names what is wrong with them)."""
    ours = Path(tok.path).read_bytes()
    reference = None
    for path in checkpoints:
        if not path or not Path(path).is_dir():
            continue
        try:
            file = find_tokenizer_file(path)
            if file.read_bytes() == ours:
                continue
            other = Tokenizer(file)
        except (OSError, ValueError, ImportError):
            continue
        reference = reference if reference is not None else tok.encode(TOKENIZER_PROBE)
        theirs = other.encode(TOKENIZER_PROBE)
        if theirs != reference:
            raise ValueError(f"{path} was trained with another tokenizer than this run's {tok.path}: its {file.name} "
                             f"(vocabulary {other.vocab_size}) encodes 'Hello, world!...' as {theirs[:6]}..., this "
                             f"run's (vocabulary {tok.vocab_size}) as {reference[:6]}...; every model of a run must "
                             "come from the same base model")


def resolve_models(args, d: "Dist | None", *flags):
    """The Hub ids among args.<flag> (a path, a list of paths, or None) replaced by their folders in the
    Hugging Face cache (hf_io.resolve_model). Local rank 0 of each node resolves first, downloading what
    is missing; the other ranks wait for it, then find everything in the cache: one download per node.
    d None: one process, no process group (evaluate.py)."""
    from data.hub import is_hub_id

    def values(flag):
        value = getattr(args, flag, None)
        return value if isinstance(value, list) else [value]

    if not any(v and is_hub_id(str(v)) for flag in flags for v in values(flag)):
        return
    resolved = node_leader_first(d, lambda: {flag: [hf_io.resolve_model(v) if v else v for v in values(flag)]
                                             for flag in flags})
    for flag, paths in resolved.items():
        for given, path in zip(values(flag), paths):
            if given != path and (d is None or d.is_main):
                print(f"--{flag.replace('_', '-')} {given}: {path}", flush=True)
        setattr(args, flag, paths if isinstance(getattr(args, flag), list) else paths[0])


def fetch_datasets(d: "Dist", *specs):
    """Download the Hub data sets named in specs (data arguments, see data/loaders.parse_sources; None
    skipped) into the Hugging Face cache: local rank 0 of each node first, the others waiting, so that
    the loads after this find them there on every rank: one download per node, as for models."""
    from data.loaders import parse_sources

    node_leader_first(d, lambda: [parse_sources(spec) for spec in specs if spec is not None], others=False)


def node_leader_first(d: "Dist | None", fn, others: bool = True):
    """fn() on local rank 0 of each node, then (others=True) on the other ranks once it has returned;
    returns its result on ranks that ran it. For work that fills a per-node cache: the others then hit it.
    d None: one process."""
    if d is None:
        return fn()
    result = fn() if d.local_rank == 0 else None
    d.barrier()
    if d.local_rank != 0 and others:
        result = fn()
    if others:
        d.barrier()
    return result


def recorded_template(path) -> str | None:
    """The conversation template a checkpoint was trained with, as this project's stages record it in
    config.json; None for a folder it did not write (a release as downloaded), a preset, or no config."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # a preset, or a missing or broken config.json: named where the model is loaded
    return config.get("template") if isinstance(config, dict) else None


def resolve_template(requested: str | None, *checkpoints) -> str:
    """The one template of a run. Every model of a run must share it: a policy trained on the chat
    template and scored by models trained on the authors' one would be judged on text it never writes.
    Only recorded templates are compared (a released folder takes whichever it is given); `requested`
    None takes the recorded one, else safe_rlhf."""
    recorded = {str(p): t for p in checkpoints if p and (t := recorded_template(p)) is not None}
    for path, trained_with in recorded.items():
        if requested is not None and trained_with != requested:
            raise ValueError(f"{path} was trained with --template {trained_with}; pass --template {trained_with} "
                             f"(now {requested})")
    if len(set(recorded.values())) > 1:
        raise ValueError("the checkpoints were trained with different templates: "
                         + ", ".join(f"{p}: {t}" for p, t in recorded.items()))
    return requested or next(iter(recorded.values()), "safe_rlhf")


def check_vocab(model: Transformer, tok, path):
    """Token ids past the embedding table would fail deep inside torch.embedding."""
    if model.args.vocab_size < tok.vocab_size:
        raise ValueError(f"{tok.path} has {tok.vocab_size} ids but {path} only embeds {model.args.vocab_size}")


def require_examples(examples, what: str, batch_size: int | None = None, log=print):
    """A clear error instead of a division by zero when nothing is left of a data set, and a
    warning when one batch would hold the same example more than once."""
    if not examples:
        raise ValueError(f"no {what} left: the data is empty or every example was dropped (see the counts above: "
                         f"--max-length? a FILE:N or --eval-fraction too small?)")
    if batch_size is not None and len(examples) < batch_size:
        log(f"warning: only {len(examples)} {what} for batches of {batch_size}: examples repeat within a batch")


def load_train_eval(load_fn, train_spec, eval_spec, eval_fraction: float, seed: int, log):
    """(train, eval) examples: eval from its own files if given, else a seeded split of train's."""
    train, _ = load_fn(train_spec, seed=seed, log=log)
    if eval_spec is not None:
        return train, load_fn(eval_spec, seed=seed, log=log)[0]
    return split_train_eval(train, eval_fraction, seed=seed)


def synthetic_task(args, d: "Dist"):
    """Generate the embedded task once (rank 0 first, the others wait), then return its paths."""
    from data.synthetic import ensure_synthetic

    if d.is_main:
        ensure_synthetic(args.synthetic_dir, seed=args.data_seed)
    d.barrier()
    return ensure_synthetic(args.synthetic_dir, seed=args.data_seed)


# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object | None  # DeviceMesh under torchrun, None in a plain process
    mixed_precision: bool = False  # bf16 compute, fp32 master weights (--precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def all_reduce_sum(self, value: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(t)
        return t

    def all_gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a small 1-D CPU tensor of any length from every rank, in rank order."""
        if not self.distributed:
            return values
        parts = [None] * self.world
        dist.all_gather_object(parts, values.tolist())
        return torch.tensor([v for part in parts for v in part], dtype=values.dtype)

    def barrier(self):
        if self.distributed:
            dist.barrier()


def check_device(device: str):
    """--device names cpu or cuda, and cuda only where torch sees a GPU."""
    kind = device.split(":")[0]  # cuda:1 names a GPU too
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected auto, cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU{_visible_devices()}")


def _visible_devices() -> str:
    """CUDA_VISIBLE_DEVICES, when set, is the usual reason a GPU goes unseen: name it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return ""
    return (f" (CUDA_VISIBLE_DEVICES={visible!r} lets it see {torch.cuda.device_count()}: list the GPU ids "
            f"to use, e.g. 0,1, or unset it)")


def setup_distributed(device: str = "auto", precision: str = "fp32") -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: then join the process group (nccl on GPUs, gloo on
    CPU) and build a 1-D device mesh. Otherwise run as a single plain process.

    precision (--precision): "bf16" is mixed precision, "auto" is bf16 on GPUs and fp32 on CPU (where
    bf16 is slower, but runs the same code path: tests use it to cover what GPU runs do)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    mixed = precision == "bf16" or (precision == "auto" and device.startswith("cuda"))
    rank, world, local_rank = cli.launch_env()
    if "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        return Dist(0, 1, 0, dev, None, mixed)
    from torch.distributed.device_mesh import init_device_mesh

    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU of its own: this node shows "
                           f"{torch.cuda.device_count()}{_visible_devices()}; start at most that many processes per "
                           "node (torchrun --nproc_per_node)")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    # On GPUs, gloo beside nccl serves collectives on CPU tensors (FSDP's CPU offload keeps shards
    # and gradients there). The timeout covers rank 0 writing a checkpoint of six 7B models while
    # the others wait in a barrier (nccl's default, 10 minutes, is too short for a slow disk).
    dist.init_process_group(backend="cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=60))
    mesh = init_device_mesh(dev.type, (world,))
    return Dist(rank, world, local_rank, dev, mesh, mixed)


def teardown_distributed(d: Dist, exit_process: bool = False):
    """Leave the process group; with exit_process (a script's last line, outside cli.main, which
    does it itself), end the rank too: see cli.leave_torchrun_rank."""
    if d.distributed:
        dist.barrier()  # without it gloo intermittently aborts at exit
        dist.destroy_process_group()
    if exit_process:
        cli.leave_torchrun_rank()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Models: build on meta, shard, then fill


def load_model(spec: str, head: str, d: Dist, *, seed: int = 0, activation_checkpointing: bool = False,
               cpu_offload: bool = False, trainable: bool = True, vocab_size: int | None = None) -> Transformer:
    """A model from a checkpoint directory or, for training from scratch, a preset name of
    model.PRESETS (initialised with `seed`, identically on every rank; vocab_size overrides the
    preset's). Its weights come from hf_io.full_state_dict, the one loading path.

    Under torchrun: built on the meta device, sharded with FSDP2 (each block, then the root;
    with d.mixed_precision, bf16 compute with fp32 master weights and fp32 gradient reduction),
    materialised empty, then filled from the full state dict that only rank 0 reads. In a plain
    process: the model itself on the device. Weights are fp32, except frozen models
    (trainable=False) under FSDP mixed precision: bf16."""
    if cpu_offload and d.device.type != "cuda":
        raise ValueError("CPU offload moves sharded parameters from the GPUs to host memory: it needs --device cuda")
    if cpu_offload and not d.distributed:
        raise ValueError("CPU offload is FSDP's: run under torchrun (--nproc_per_node=1 for one GPU)")
    src = hf_io.describe(spec, head, vocab_size=vocab_size)
    if src.fresh_score_head and not trainable:
        raise ValueError(f"{spec} is a language model, not a trained score model (a frozen reward or "
                         f"cost model needs train_score.py's output)")
    state = hf_io.full_state_dict(src, seed=seed) if d.is_main or not d.distributed else None

    # Under FSDP's mixed precision a frozen model is only ever used as bf16 copies of its weights:
    # store it that way (the same forward, half the memory). Not under autocast in one process,
    # whose fp32 residual stream a bf16 model would not share with the trained fp32 models (the
    # actor and its reference would then differ from the first step).
    dtype = torch.bfloat16 if d.mixed_precision and not trainable and d.distributed else torch.float32
    if state is not None and dtype != torch.float32:
        state = {k: v.to(dtype) for k, v in state.items()}
    if not d.distributed:
        model = Transformer(src.args, head=head)
        model.load_state_dict(state, strict=True)
        model.to(d.device)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        with torch.device("meta"):
            model = Transformer(src.args, head=head).to(dtype)
        shard(model, d, cpu_offload=cpu_offload, frozen=not trainable)
        model.to_empty(device="cpu" if cpu_offload else d.device)
        set_model_state_dict(model, state or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.score_stats = src.score_stats
    model.source_dtype = src.dtype  # what the product is saved in by default
    model.activation_checkpointing = activation_checkpointing
    model.requires_grad_(trainable)
    if not trainable:
        model.eval()
    return model


def check_models(policies=(), reward=None, cost=None):
    """What each model is, from its config.json alone, before any data or weights are read: a policy
    must be a language model (hf_io.describe refuses a score model), a reward or cost model a score
    model trained for that objective (check_score_model). A bad config.json is named here too
    (hf_io.read_config checks its fields), not after the data has loaded."""
    for spec in policies:
        if spec:
            hf_io.describe(spec, "lm")
    for objective, spec in (("reward", reward), ("cost", cost)):
        if spec and str(spec).lower() != "none":
            check_score_model(spec, objective)


def check_score_model(spec, objective: str):
    """A reward model passed as the cost model (or the other way round) trains or evaluates against
    the wrong signal without any error; its saved statistics say what it was trained for."""
    src = hf_io.describe(spec, "score")
    if src.saved_head != "score":
        raise ValueError(f"{spec} is a language model, not a trained {objective} model: pass train_score.py "
                         f"--objective {objective}'s product (<out>/model)")
    trained_for = (src.score_stats or {}).get("objective")
    if trained_for not in (None, objective):
        raise ValueError(f"{spec} was trained as a {trained_for} model, but is given as the {objective} model")


def shard(model: Transformer, d: Dist, *, cpu_offload: bool, frozen: bool = False):
    """FSDP2: one unit per transformer block, then the root (embeddings, final norm, head). FSDP
    keeps the root's parameters gathered after forward for the backward that follows; a frozen
    model has no backward, so its root reshards like the blocks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {"mesh": d.mesh}
    if d.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs, **({"reshard_after_forward": True} if frozen else {}))
    # generate() is entered like forward: FSDP's root hooks (lazy init, root all-gather) run for it too.
    register_fsdp_forward_method(model, "generate")
    # Our forward returns views (log-probs reshaped to [B, T]); nothing modifies them in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


@contextlib.contextmanager
def gathered(model):
    """Hold an FSDP2 model's full parameters for a whole generation: one all-gather per block
    for all decoding steps instead of one per block per token, then reshard. A no-op on a plain
    module."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP2's default: blocks reshard after forward; the root keeps its (small) parameters
            # for the backward that follows.
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def autocast(d: Dist):
    """bf16 autocast for a plain process under mixed precision (FSDP's MixedPrecisionPolicy does
    it under torchrun)."""
    return torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.mixed_precision and not d.distributed)


def sft_nll(model, batch, device):
    """Summed next-token NLL over the target tokens (response + EOS) of a right-padded SFT batch,
    and the number of those tokens: position t predicts token t + 1. The SFT loss, and PPO's PTX
    term."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    target_mask = batch["loss_mask"][:, 1:].to(device)
    logp = model(ids[:, :-1], mask[:, :-1], targets=ids[:, 1:])
    return -(logp * target_mask).sum(), target_mask.sum()


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    warmup_steps: int = 0, total_steps: int = 1, schedule: str = "cosine"):
    """AdamW without weight decay on vectors (norm weights, biases), and a per-step LR schedule:
    linear warmup, then cosine to 0 ("cosine") or flat ("constant")."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)

    def factor(step: int) -> float:  # step = optimiser steps taken so far
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (over every rank's shards); return it before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)  # 0: measure only
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def train_step(model, optimizer, scheduler, micro_batches, loss_fn, denominator, d: Dist, grad_clip: float):
    """One optimiser step over this rank's micro-batches.

    loss_fn(batch) -> (summed loss over the batch's units, dict of summed statistics). Units are
    target tokens for SFT and pairs for score models; `denominator` is their number in the whole
    global batch (all ranks), so the gradient is that of the global mean. Returns the global
    mean loss, the statistics summed over ranks, the gradient norm and the learning rate used."""
    totals: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    # Every micro-batch's gradients are reduce-scattered at once (FSDP's default). Skipping that
    # until the last one would save communication but hold an unsharded fp32 copy of all
    # gradients on every GPU meanwhile (26 GiB at 7B).
    for batch in micro_batches:
        loss, stats = loss_fn(batch)
        # FSDP averages gradients over ranks; x world turns that into the mean over the global batch.
        (loss * (d.world / float(denominator))).backward()
        loss_sum += loss.detach().double()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + torch.as_tensor(v, dtype=torch.float64, device=d.device)
    grad_norm = clip_grad_norm(model, grad_clip)
    if not math.isfinite(grad_norm):  # the global norm: every rank stops here together
        raise FloatingPointError(f"gradient norm {grad_norm} before optimiser step {scheduler.last_epoch + 1}: "
                                 "not taken (non-finite weights or loss?); the latest checkpoint is untouched")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    loss = float(d.all_reduce_sum(loss_sum)) / float(denominator)
    return loss, {k: float(d.all_reduce_sum(v)) for k, v in totals.items()}, grad_norm, lr


# ----------------------------------------------------------------------------------------------
# Data order


def batches_for_step(step: int, n_examples: int, global_batch: int, micro_batch: int, d: Dist, seed: int):
    """This rank's micro-batches (lists of example indices) for optimiser step `step`.

    The example stream is a fresh permutation of the data per epoch (seeded by seed and epoch);
    step k takes the k-th `global_batch` slice of the stream, split into micro-batches round-robin
    over ranks. Same (seed, step) => same examples, whatever the number of ranks, so a resumed run
    sees exactly what an uninterrupted one would. Epochs are counted in examples (--epochs E is
    ceil(E n / global_batch) steps), not aligned to steps: a step that crosses an epoch's end takes
    the rest of it and the start of the next permutation (so it may hold an example twice), and the
    last step may take up to global_batch - 1 examples of epoch E + 1."""
    if global_batch % (micro_batch * d.world):
        raise ValueError(f"--batch-size {global_batch} must be a multiple of --micro-batch-size "
                         f"{micro_batch} x {d.world} ranks")
    start = step * global_batch
    indices = []
    while len(indices) < global_batch:
        epoch, offset = divmod(start + len(indices), n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        indices += perm[offset:offset + global_batch - len(indices)].tolist()
    micro = [indices[i:i + micro_batch] for i in range(0, global_batch, micro_batch)]
    return micro[d.rank::d.world]


def eval_micro_batches(examples: list, micro_batch: int, d: Dist):
    """This rank's share of an eval set (every world-th example) in micro-batches, as (examples,
    real) pairs. Every rank yields the same number of micro-batches: under FSDP each forward is a
    collective, so a rank with one forward fewer would leave the others waiting forever. A rank
    short of a micro-batch gets a stand-in (the set's first example, real=False) to run and discard."""
    mine = examples[d.rank::d.world]
    per_rank = -(-len(examples) // d.world)
    for i in range(0, per_rank, micro_batch):
        chunk = mine[i:i + micro_batch]
        yield (chunk, True) if chunk else (examples[:1], False)


def steps_for_epochs(n_examples: int, global_batch: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * n_examples / global_batch))


# ----------------------------------------------------------------------------------------------
# Logging


class Logger:
    """One JSON object per optimiser step in <out>/log.jsonl (rank 0), and a one-line progress bar
    on the terminal. On resume, lines past the resumed step (written before the kill) are dropped,
    so the log reads as if the run had never stopped."""

    def __init__(self, out_dir, d: Dist, total_steps: int, name: str, resume_step: int = 0, report_to=None,
                 config: dict | None = None):
        from trackers import Trackers, open_trackers

        self.d, self.total, self.name = d, total_steps, name
        cli.PROGRESS.name, cli.PROGRESS.total, cli.PROGRESS.step = name, total_steps, resume_step
        self.path = Path(out_dir) / "log.jsonl"
        self.start_time, self.start_step = time.time(), resume_step
        self.tty = sys.stderr.isatty()
        if resume_step < total_steps:  # the first line comes after a whole step: minutes at 7B
            d.print(f"[{name}] step {resume_step + 1}/{total_steps} running (the first step is the slowest: "
                    "allocation, kernel compilation)")
        if d.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
                fileio.atomic_write(self.path, "".join(line + "\n" for line in kept))
            # TensorBoard / wandb (--report-to) mirror each line; the kept ones for a tracker that lacks them.
            config = json.loads(json.dumps(config or {}, default=str))  # the run's flags, as plain values
            self.trackers = open_trackers(report_to, out_dir, name, config, resume_step, map(json.loads, kept))
        else:
            self.trackers = Trackers([])

    def log(self, step: int, metrics: dict, summary: str = ""):
        cli.PROGRESS.step = step
        if not self.d.is_main:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(step, record)
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{self.name}] [{bar}] {step}/{self.total} {summary} | {_clock(elapsed)}<{_clock(eta)}"
        if self.tty:
            print("\r" + line[:200].ljust(120), end="", file=sys.stderr, flush=True)
        elif step == self.total or step % max(1, self.total // 20) == 0 or step == self.start_step + 1:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        self.trackers.close()
        if self.d.is_main and self.tty:
            print(file=sys.stderr)


def _step_of(line: str) -> float:
    """The step of a log line; a line that does not parse (cut short by a kill or a full disk: only the
    last can be) counts as past every checkpoint, so it is dropped with the other steps being redone."""
    if not line.strip():
        return math.inf
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def save_final(model, out_dir, d: Dist, tok: Tokenizer, args, name: str = "model"):
    """The stage's product: an HF-format directory <out>/<name> (atomic), with the tokenizer's files
    (and its special-token and generation configs) beside the weights, so the next stage, or
    transformers, needs one path; config.json records the conversation template and the special token
    ids. The weights are in the dtype of the checkpoint the run started from (a bf16 7B model stays
    13 GB), or --save-dtype."""
    target = Path(out_dir) / name
    dtype = model.source_dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    # The special token ids as transformers' config.json carries them (generate's defaults without a
    # generation_config.json), and the template, which later stages and evaluate.py read back.
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids[0] if len(tok.eos_ids) == 1 else list(tok.eos_ids),
           "pad_token_id": tok.pad_id, "template": args.template}
    hf_io.save_pretrained(model, target, dtype=dtype, extra_files=tok.files_to_save(), extra_config=ids)
    d.barrier()
    return target
