"""Measured per-rank peak memory of one PPO-Lagrangian iteration on CPU, phase by phase: the check
of bench/memory_plan.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/measure_memory.py \
        --dim 512 --layers 8 --heads 8 --kv-heads 4 --vocab 32000 --hidden 1408 \
        --micro-batch 4 --max-length 128 --precision fp32 --json out/memory_measured.json

What runs is ppo_lag.py's own code, the iteration the plan runs on fake tensors
(memory_plan.ppo_iteration): the six models come from `ppo_lag.load_models` (so
`training.load_model` and `training.shard` build, shard and fill them, frozen ones in bf16 under
mixed precision), then two iterations of `ppo_lag.rollout` (generation inside
`training.gathered(actor)` with `Transformer.generate`, then the scoring forwards),
`ppo_lag.advantages` with the Lagrange multiplier's lambda and `ppo_lag.ppo_update`
(`training.train_step` of the actor and both critics: forward, backward, gradient clipping, AdamW),
on the plan's stand-in data (memory_plan.stand_in_prompts: random prompts of random lengths,
left-padded, the first of each micro-batch at full prompt length; memory_plan.stand_in_tokenizer:
pad 0, EOS 1) with random-init weights saved as checkpoints once. The second iteration is the one
measured (the AdamW state exists from then on, as in a long run). Every answer runs to
--max-new-tokens unless the random policy samples EOS (id 1 of --vocab: rare), the worst case the
plan assumes. The phases are marked as the plan marks them (memory_plan.Phases).

Two independent accountings of the same run, per rank and per phase (generation: inside
training.gathered; scoring: from there to the end of rollout; learning: each train_step):

* allocator: torch.profiler(profile_memory=True) records, over both iterations, every allocation
  and free of c10's CPU allocator with its address and size (including buffers allocated inside
  kernels, which no Python-level hook sees). Starting from the bytes held when it starts (a census
  of every tensor storage reachable from Python once the models are loaded), matching frees to
  allocations by address gives the bytes allocated at each moment; its maximum within a phase's
  window (record_function markers) is the phase's peak: what torch.cuda.max_memory_allocated
  reports on a GPU. This is the measurement. Left out: buffers that gloo allocates inside a
  collective (the full-size copy of its reduce-scatter input: NCCL's buffers live outside
  PyTorch's allocator, in the plan's fixed margin); their size is reported. Why not profile from
  the very start: gloo's worker threads drop the last reference to rank 0's broadcast state dict
  while loading, and the profiler sees no free on those threads; and it reports no free of a block
  allocated before it started, so it must start before anything the iterations free.
* tensors: bench/memory_plan.py's LiveMemory (live tensor storages by the code that allocated them)
  on the real tensors: the plan's own accounting, whose breakdown (parameters, gradients, AdamW
  state, gathered parameters, activations, ...) is compared with the plan category by category.
  Gloo's collective copies are kept out of its total too (reported apart), as for the allocator.

Writes one JSON with every rank's figures (rank 0 writes it).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import ppo_lag  # noqa: E402
import training  # noqa: E402
from memory_plan import (  # noqa: E402
    MARK,
    STEP,
    LiveMemory,
    Phases,
    ppo_iteration,
    stand_in_prompts,
    stand_in_tokenizer,
)
import hf_io  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dim", type=int, default=512)
    a("--layers", type=int, default=8)
    a("--heads", type=int, default=8)
    a("--kv-heads", type=int, default=4)
    a("--vocab", type=int, default=32000)
    a("--hidden", type=int, default=1408)
    a("--micro-batch", type=int, default=4, help="sequences per forward per rank (one micro-batch per rank)")
    a("--max-length", type=int, default=128, help="tokens per sequence: prompt + answer")
    a("--max-new-tokens", type=int, default=None, help="answer tokens (default max-length / 2)")
    a("--precision", choices=["fp32", "bf16"], default="fp32")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    a("--algo", choices=["ppo_lag", "ppo", "reward_shaping"], default="ppo_lag")
    a("--models-dir", default="out/memory_plan_models", help="where the random-init checkpoints are written once")
    a("--json", default=None, help="write every rank's figures here (rank 0)")
    return p.parse_args(argv)


def checkpoints(ns, args: ModelArgs, d) -> tuple[str, str]:
    """An LM and a score checkpoint of this shape (random init), written once by rank 0."""
    key = hashlib.sha1(json.dumps(vars(args), sort_keys=True, default=str).encode()).hexdigest()[:10]
    base = Path(ns.models_dir) / key
    lm, score = base / "lm", base / "score"
    if d.is_main:
        for path, head in ((lm, "lm"), (score, "score")):
            if not (path / "config.json").is_file():
                model = Transformer(args, head=head)
                model.init_weights(seed=0)
                hf_io.save_pretrained(model, path)
                del model
    d.barrier()
    return str(lm), str(score)


def allocator_events(prof) -> tuple[list[tuple[int, int, int]], int]:
    """(time ns, address, bytes: + allocation / - free) of every CPU allocator event, in time order,
    except those inside a collective (c10d ops and gloo's own "gloo:" ranges: gloo's buffers, e.g.
    the full-size copy its reduce-scatter makes, or the staging buffer of a bf16 all-gather: NCCL
    keeps such buffers outside PyTorch's allocator, so a GPU's max_memory_allocated does not see
    them; gloo also frees some of them on its worker threads, which the profiler does not watch).
    Also returns the largest such buffer, to report it."""
    from torch._C._profiler import _EventType

    events, largest = [], 0
    stack = [(node, False) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, in_collective = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size, in_collective))
        inside = in_collective or node.name.startswith(("c10d::", "gloo:"))
        stack.extend((child, inside) for child in node.children)
    events.sort(key=lambda e: e[0])
    out, collective = [], set()
    for t, ptr, nbytes, in_collective in events:
        if nbytes > 0 and in_collective:
            collective.add(ptr)  # its free (wherever it happens) is dropped too
            largest = max(largest, nbytes)
        elif nbytes > 0:
            collective.discard(ptr)
            out.append((t, ptr, nbytes))
        elif ptr in collective:
            collective.discard(ptr)
        else:
            out.append((t, ptr, nbytes))
    return out, largest


def census() -> dict:
    """Bytes of every tensor storage reachable from Python (gc.get_objects; a DTensor's local shard),
    counted once each: what is allocated between two iterations, when no autograd graph is alive."""
    seen, total, count = set(), 0, 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = getattr(obj, "_local_tensor", obj)
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            continue
        if st.data_ptr() == 0 or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
        count += 1
    return {"bytes": total, "storages": count}


def allocator_peaks(prof, baseline: int) -> dict:
    """Per phase window (record_function markers): bytes allocated at its start and at most inside.

    The profiler runs over the measured iteration only: the bytes allocated when it starts are the
    census of live tensors (`baseline`), and every event moves that total. Allocations are matched to
    frees by address (a free the profiler missed would leave a block counted until its address is
    handed out again: the figures can err high, never low); a free of a block allocated before the
    profiler started subtracts its size."""
    import numpy as np

    live, total, times, running = {}, baseline, [], []
    unmatched_frees = 0
    events, collective_largest = allocator_events(prof)
    for t, ptr, nbytes in events:
        if nbytes > 0:
            total += nbytes - live.pop(ptr, 0)
            live[ptr] = nbytes
        else:
            freed = live.pop(ptr, None)
            if freed is None:  # allocated before profiling began: part of the baseline
                unmatched_frees += 1
                freed = -nbytes
            total -= freed
        times.append(t)
        running.append(total)
    times, running = np.array(times, dtype=np.int64), np.array(running, dtype=np.int64)
    out = {"_run": {"max": int(running.max()) if len(running) else 0, "events": len(times),
                    "unmatched_frees": unmatched_frees, "largest_collective_buffer": collective_largest}}
    for e in prof.profiler.kineto_results.events():
        if not e.name().startswith(MARK):
            continue
        start, end = e.start_ns(), e.start_ns() + e.duration_ns()
        i0, i1 = np.searchsorted(times, start, "left"), np.searchsorted(times, end, "right")
        at_start = int(running[i0 - 1]) if i0 > 0 else baseline
        peak = max(at_start, int(running[i0:i1].max()) if i1 > i0 else at_start)
        out[e.name()[len(MARK):]] = {"start": at_start, "peak": peak}
    return out


def main(argv=None):
    ns = parse_args(argv)
    new = ns.max_new_tokens or ns.max_length // 2
    prompt_len = ns.max_length - new
    d = training.setup_distributed("cpu", ns.precision)
    margs = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.heads, n_kv_heads=ns.kv_heads, vocab_size=ns.vocab,
                      hidden_dim=ns.hidden, max_seq_len=max(ns.max_length, 512))
    lm, score = checkpoints(ns, margs, d)
    cost = score if ns.algo != "ppo" else "none"
    args = ppo_lag.parse_args([
        "--algo", ns.algo, "--actor", lm, "--reward-model", score, "--cost-model", cost,
        "--batch-size", str(ns.micro_batch * d.world), "--micro-batch-size", str(ns.micro_batch),
        "--max-length", str(prompt_len), "--max-new-tokens", str(new), "--precision", ns.precision,
        "--device", "cpu", "--ptx-coeff", "0", "--threshold", "0", "--out", "out/memory_plan_unused",
        "--activation-checkpointing" if ns.activation_checkpointing else "--no-activation-checkpointing"])
    tok = stand_in_tokenizer(ns.vocab)
    prompts = stand_in_prompts(args.batch_size, prompt_len, ns.vocab, ns.micro_batch, d.world, STEP, args.seed)
    training.seed_everything(0)

    tracker = LiveMemory()
    tracker.uncounted = {"collective"}  # as the allocator measurement: see allocator_events
    phases = Phases(tracker, markers=True)
    phases.on = False  # the first iteration creates the AdamW state; the second is measured
    t0 = time.time()
    timings = []

    def iteration(step):
        t = time.time()
        ppo_iteration(step, models, prompts, None, lam, args, d, tok, phases)
        timings.append(time.time() - t)

    with tracker:
        models = ppo_lag.load_models(args, d, tok, total_steps=2)
        lam = ppo_lag.make_multiplier(args, d).value
        names = {id(getattr(models, name)): name.replace("_", " ") for name in models.optimizers}
        with phases.instrument(names):
            gc.collect()
            baseline = census()
            baseline["tracker"] = tracker.device_total
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                iteration(STEP - 1)
                phases.on = True
                iteration(STEP)
    seconds = time.time() - t0
    alloc = allocator_peaks(prof, baseline["bytes"])
    alloc["_run"]["baseline"] = baseline
    alloc["_run"]["largest_collective_tensors"] = dict(tracker.uncounted_peak)
    mine = {"rank": d.rank, "allocator": alloc, "seconds": seconds, "iteration_seconds": timings,
            "tensors": {name: {k: v for k, v in rec.items()} for name, rec in tracker.phases.items()}}
    every = [None] * d.world
    dist.all_gather_object(every, mine)
    if d.is_main:
        config = {**vars(ns), "world": d.world, "max_new_tokens": new, "prompt_length": prompt_len,
                  "params_actor": sum(p.numel() for p in models.actor.parameters())}
        report = {"config": config, "ranks": every}
        if ns.json:
            Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.json).write_text(json.dumps(report, indent=1) + "\n")
        for name in ("generation", "scoring", "learning"):
            a = max(r["allocator"][name]["peak"] for r in every) / 2**20
            t = max(r["tensors"][name]["peak"] for r in every) / 2**20
            print(f"{name:<12} peak over ranks: allocator {a:9.1f} MiB   live tensors {t:9.1f} MiB")
        print(f"({d.world} ranks, {seconds:.0f} s)")
    training.teardown_distributed(d, exit_process=True)


if __name__ == "__main__":
    main()
