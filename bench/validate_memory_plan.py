"""bench/memory_plan.py against bench/measure_memory.py: plan vs measured per-rank peaks, per phase.

    python bench/validate_memory_plan.py                 # the default grid: 2 and 4 ranks, fp32 and bf16
    python bench/validate_memory_plan.py --configs 2:fp32:noac 4:bf16:ac --rerun

Each config (ranks:precision:ac|noac) is measured under torchrun on CPU (gloo) with a ~56M-parameter
LLaMA shape (dim 512, 8 layers, 8 heads / 4 kv heads, hidden 1408, vocab 32000), micro-batch 4,
128 tokens (64 prompt + 64 answer), then planned with the same shape and `--device cpu` (the
PyTorch kernel paths and single-tensor AdamW that run on CPU). Both run ppo_lag.py's own rollout,
advantages and ppo_update on the same stand-in data, the plan on fake tensors. Prints markdown
tables: per phase the plan, the allocator-level measurement (max over ranks), their difference, and
the measured live tensors; then the plan's breakdown beside the measured one (live tensors by
category). Measurements are cached in out/memory_validation/ (--rerun to redo). Exits with status 1
when a generation, scoring or learning peak of the plan is more than --tolerance off the measured one.
tests/test_memory_plan.py runs the same comparison at a tiny shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from memory_plan import CATEGORIES  # noqa: E402

SHAPE = ["--dim", "512", "--layers", "8", "--heads", "8", "--kv-heads", "4", "--vocab", "32000", "--hidden", "1408"]
RUN = ["--micro-batch", "4", "--max-length", "128"]
PHASES = ["generation", "scoring", "learning", "learning: actor fwd+bwd", "learning: actor step",
          "learning: reward critic fwd+bwd", "learning: cost critic fwd+bwd"]
MAIN_PHASES = ("generation", "scoring", "learning")
MiB = 2**20


def parse_config(text):
    world, precision, ac = text.split(":")
    return int(world), precision, ac == "ac"


def config_name(world, precision, ac) -> str:
    return f"w{world}_{precision}_{'ac' if ac else 'noac'}"


def ac_flag(ac: bool) -> str:
    return "--activation-checkpointing" if ac else "--no-activation-checkpointing"


def measure(world, precision, ac, out: Path, rerun: bool, shape=SHAPE, run=RUN, models_dir=None) -> dict:
    """bench/measure_memory.py under torchrun (cached in out/)."""
    path = out / f"measured_{config_name(world, precision, ac)}.json"
    if rerun or not path.is_file():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(ROOT / "bench/measure_memory.py"), *shape, *run, "--precision", precision, ac_flag(ac),
               "--json", str(path), *(["--models-dir", str(models_dir)] if models_dir else [])]
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        quiet = not os.environ.get("VERBOSE")
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.STDOUT if quiet else None, text=True)
        if done.returncode:
            raise RuntimeError(f"bench/measure_memory.py failed:\n{(done.stdout or '')[-4000:]}")
    return json.loads(path.read_text())


def plan(world, precision, ac, out: Path, shape=SHAPE, run=RUN) -> dict:
    """bench/memory_plan.py with the same shape, on the CPU code paths."""
    path = out / f"plan_{config_name(world, precision, ac)}.json"
    cmd = [sys.executable, str(ROOT / "bench/memory_plan.py"), *shape, *run, "--gpus", str(world),
           "--precision", precision, "--device", "cpu", "--no-flip", "--json", str(path), ac_flag(ac)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench/memory_plan.py failed:\n{done.stderr[-4000:]}")
    return json.loads(path.read_text())


def compare(measured: dict, planned: dict) -> list[dict]:
    """Per phase: plan, allocator-level measurement and measured live tensors (max over ranks), bytes."""
    rows = []
    for phase in PHASES:
        if phase not in planned["phases"]:
            continue
        pl = planned["phases"][phase]["peak"]
        al = max(r["allocator"][phase]["peak"] for r in measured["ranks"])
        te = max(r["tensors"][phase]["peak"] for r in measured["ranks"])
        rows.append({"phase": phase, "plan": pl, "allocator": al, "tensors": te, "diff": (pl - al) / al})
    return rows


def breakdown(measured: dict, planned: dict) -> list[tuple]:
    """(phase, category label, plan, measured live tensors): each category's largest amount in a phase."""
    items = []
    for phase in MAIN_PHASES:
        for key, label in CATEGORIES:
            pv = planned["phases"][phase]["cat_peak"].get(key, 0)
            mv = max(r["tensors"][phase]["cat_peak"].get(key, 0) for r in measured["ranks"])
            if max(pv, mv) >= MiB:
                items.append((phase, label, pv, mv))
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["2:fp32:noac", "2:bf16:noac", "4:fp32:noac", "4:bf16:noac",
                                                     "2:fp32:ac", "4:bf16:ac"])
    p.add_argument("--out", default="out/memory_validation")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.15, help="largest accepted |plan - measured| / measured")
    ns = p.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, parts, worst = [], [], 0.0
    for text in ns.configs:
        world, precision, ac = parse_config(text)
        measured, planned = measure(world, precision, ac, out, ns.rerun), plan(world, precision, ac, out)
        name = f"{world} ranks, {precision}, AC {'on' if ac else 'off'}"
        for r in compare(measured, planned):
            if r["phase"] in MAIN_PHASES:
                worst = max(worst, abs(r["diff"]))
            rows.append(f"| {name} | {r['phase']} | {r['plan'] / MiB:.0f} | {r['allocator'] / MiB:.0f} | "
                        f"{r['diff']:+.1%} | {r['tensors'] / MiB:.0f} |")
        parts.append((name, breakdown(measured, planned)))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print("| config | phase | plan MiB | measured MiB (allocator) | plan - measured | measured MiB (live tensors) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\nlargest |plan - measured| over the generation, scoring and learning peaks: {worst:.1%}\n")
    print("Each category's own largest amount within a phase (MiB; it need not coincide with the phase's "
          "total peak), plan vs measured live tensors (max over ranks):\n")
    for name, items in parts:
        print(f"**{name}**\n")
        print("| phase | category | plan MiB | measured MiB |")
        print("| --- | --- | ---: | ---: |")
        for phase, label, pv, mv in items:
            print(f"| {phase} | {label} | {pv / MiB:.1f} | {mv / MiB:.1f} |")
        print()
    return 0 if worst <= ns.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
