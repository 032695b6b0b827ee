"""Checkpoint save/load time and peak host memory per rank: the old path (full state dicts gathered
to rank 0, which writes an HF directory per model, `<name>.optim.pt` with torch.save and rng.pt:
checkpoint.py and hf_io.py of commit d5a8f98, read with git show) against the new sharded one (checkpoint.py:
every rank writes and reads its own shards through DCP's safetensors storage), and the final
HF-format save (hf_io.save_pretrained: old = every tensor gathered into one rank-0 dict, then
written; new = streamed to disk one gathered tensor at a time).

    python bench/bench_checkpoint.py                         # ~56M parameters + AdamW, 2 and 4 gloo ranks
    python bench/bench_checkpoint.py --worlds 2 --dim 256    # smaller

Each phase (save, load, final save) runs in a fresh torchrun job. Per rank it records the time
of the call (after a barrier) and the resident set: VmRSS before the call, and VmHWM after it,
with the high-water mark reset just before the call (/proc/self/clear_refs = 5), so "peak" is the
most host memory the rank held during the call, and "+peak" that minus what it held before
(the model's shards, the optimiser's, the Python/torch runtime). File pages mapped while reading
(safetensors and torch.load(mmap=True) read through mmap) count as resident, as the kernel counts them.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OLD_COMMIT = "d5a8f98"  # checkpoint.py and hf_io.py before the sharded checkpoints


def status(key: str) -> int:
    """VmRSS / VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")


def old_modules():
    """checkpoint.py and hf_io.py as they were at OLD_COMMIT, imported as checkpoint_old/hf_io_old."""
    modules = {}
    for name in ("hf_io", "checkpoint"):
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        file = Path(tempfile.gettempdir()) / f"{name}_old_{os.getpid()}.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(f"{name}_old", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (dataclasses look their module up there)
        spec.loader.exec_module(module)
        modules[name] = module
    modules["checkpoint"].hf_io = modules["hf_io"]  # the old checkpoint reads weights through the old hf_io
    return modules["checkpoint"], modules["hf_io"]


# ----------------------------------------------------------------------------------------------
# Worker: one phase under torchrun


def worker(args):
    import torch
    import torch.distributed as dist

    import checkpoint
    import hf_io
    import training

    torch.set_num_threads(1)
    d = training.setup_distributed("cpu", "fp32")
    model = training.load_model(str(args.init), "lm", d)
    optimizer, scheduler = training.build_optimizer(model, 1e-4, 0.1, total_steps=10)
    models = {"model": (model, optimizer, scheduler)}
    if args.impl.startswith("new@"):  # smaller files: the bound on what a rank holds while saving
        checkpoint.FILE_BYTES_PER_RANK = int(args.impl.removeprefix("new@").removesuffix("MiB")) * 2**20
    final_save = functools.partial(hf_io.save_pretrained, model)
    if args.impl == "old":
        old_checkpoint, old_hf_io = old_modules()
        final_save = model.save_pretrained = functools.partial(old_hf_io.save_pretrained, model)  # old checkpoint.py calls it
        ckpt = old_checkpoint.Checkpointer(args.dir, d)
    else:
        ckpt = checkpoint.Checkpointer(args.dir, d)
    if args.phase in ("save", "final"):  # one step, so that AdamW has its state
        ids = torch.randint(0, model.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    d.barrier()
    before = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    if args.phase == "save":
        ckpt.save(1, models, {})
    elif args.phase == "load":
        ckpt.load(ckpt.latest(), models)
    else:
        final_save(Path(args.dir) / "final")
    d.barrier()
    seconds = time.perf_counter() - t0
    mine = {"rank": d.rank, "seconds": seconds, "rss_before": before, "peak": status("VmHWM")}
    everyone = [None] * d.world
    dist.all_gather_object(everyone, mine)
    if d.is_main:
        Path(args.result).write_text(json.dumps(everyone))
    training.teardown_distributed(d, exit_process=True)


# ----------------------------------------------------------------------------------------------
# Driver


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4", help="numbers of gloo ranks")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1408)
    parser.add_argument("--small-files", type=int, default=64,
                        help="also run the new path with files of this many MiB per rank (0: not)")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    import hf_io
    from model import ModelArgs, Transformer

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_ckpt_"))
    work.mkdir(parents=True, exist_ok=True)
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, vocab_size=args.vocab,
                      hidden_dim=args.hidden)
    init = work / "init"
    model = Transformer(margs)
    model.init_weights(seed=0)
    hf_io.save_pretrained(model, init)
    params = sum(p.numel() for p in model.parameters())
    del model
    print(f"model: {params / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab {args.vocab}), "
          f"fp32 + AdamW: {params * 4 / 2**20:.0f} MiB of weights, {params * 8 / 2**20:.0f} MiB of optimiser state; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)

    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for impl in ("old", "new", *([f"new@{args.small_files}MiB"] if args.small_files else [])):
            out = work / f"{impl}_{world}"
            shutil.rmtree(out, ignore_errors=True)
            for phase in ("save", "load") if impl.startswith("new@") else ("save", "load", "final"):
                result = work / f"{impl}_{world}_{phase}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       str(Path(__file__).resolve()), "--worker", "--phase", phase, "--impl", impl, "--dir", str(out),
                       "--init", str(init), "--result", str(result)]
                # A fixed mmap threshold: freed large buffers go back to the OS at once, so the resident
                # set before a call is not padded by what glibc kept from loading the model.
                env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch", "MALLOC_MMAP_THRESHOLD_": "1048576"}
                for attempt in (1, 2):  # a shared machine: one retry of a failed job
                    job = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
                    if job.returncode == 0:
                        break
                    print(f"world {world} {impl} {phase} failed (attempt {attempt}):\n{job.stderr[-3000:]}", flush=True)
                else:
                    raise SystemExit(1)
                ranks = json.loads(result.read_text())
                size = du(out / "checkpoints") if phase != "final" else du(out / "final")
                rows.append((world, impl, phase, ranks, size))
                r0 = ranks[0]
                print(f"world {world} {impl:10s} {phase:5s}: {max(r['seconds'] for r in ranks):6.2f} s | rank 0 peak "
                      f"{r0['peak'] / 2**20:6.0f} MiB (+{(r0['peak'] - r0['rss_before']) / 2**20:.0f}) | max over ranks "
                      f"+{max(r['peak'] - r['rss_before'] for r in ranks) / 2**20:.0f} MiB | on disk {size / 2**20:.0f} MiB",
                      flush=True)

    print("\n| ranks | path | phase | time (s) | rank 0: peak RSS (+ during the call), MiB | other ranks: max + during the call, MiB | on disk, MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    names = {"save": "checkpoint save", "load": "checkpoint load (resume)", "final": "final HF save"}
    for world, impl, phase, ranks, size in rows:
        r0, others = ranks[0], ranks[1:]
        other = max((r["peak"] - r["rss_before"]) / 2**20 for r in others) if others else float("nan")
        print(f"| {world} | {impl} | {names[phase]} | {max(r['seconds'] for r in ranks):.2f} | "
              f"{r0['peak'] / 2**20:.0f} (+{(r0['peak'] - r0['rss_before']) / 2**20:.0f}) | +{other:.0f} | {size / 2**20:.0f} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
