"""Running the stage scripts, written once: pipeline.py and rounds.py run every stage as a subprocess
(so that --launcher can put it under torchrun), skip a step whose product exists, and time the rest.

    run_script(script, flags, launcher)     one stage script; a failure exits with the command to re-run
    steps = Steps(timings_path)             steps.run(name, product, fn): skipped when the product exists
                                            (and, given inputs=, is newer than they are)
    steps.run_together(jobs, launcher)      stage scripts side by side, each its own process (--jobs 2)

A step is skipped when its product exists; an interrupted stage resumes from its own checkpoints
when it runs again. So re-running the same command after a crash or Ctrl-C finishes the work.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def command(script: str, flags, launcher=None) -> list[str]:
    """The command line of a stage script: `launcher` (e.g. ["torchrun", "--nproc_per_node=8"]) or this Python."""
    return [*(launcher or [sys.executable]), str(ROOT / script), *map(str, flags)]


def run_script(script: str, flags, launcher=None):
    cmd = command(script, flags, launcher)
    code = subprocess.run(cmd).returncode  # in the caller's directory: relative paths mean what they say
    if code != 0:
        sys.exit(f"{script} failed (exit {code}); fix it and re-run the same command to resume:\n  {shlex.join(cmd)}")


class Steps:
    """Named steps, each making one product (a file): a step whose product exists is skipped and said
    so; one that runs is timed, its time kept in `timings` (and in timings_path, when given)."""

    def __init__(self, timings_path=None):
        self.path = Path(timings_path) if timings_path else None
        self.timings = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    def run(self, name: str, product, fn, header: str = "", made_with: tuple | None = None, inputs=()):
        """fn() makes `product` unless it exists. made_with=(file, record): what the product is made with
        (a stage's flags), kept in `file` beside it, so that a skip with other flags is pointed out, not silent.
        inputs: the files the product is computed from (an evaluation's models). Given them, a product older
        than any, or made with other flags, is made again instead: an evaluation costs little beside the
        training that made its models, and a stale one misleads."""
        product = Path(product)
        if product.exists():
            other_flags = bool(made_with) and Path(made_with[0]).is_file() and \
                json.loads(Path(made_with[0]).read_text()) != made_with[1]
            newer = [str(i) for i in inputs if Path(i).exists() and Path(i).stat().st_mtime_ns > product.stat().st_mtime_ns]
            if not inputs or not (other_flags or newer):
                print(f"== {name}: {product} exists, skipped", flush=True)
                if other_flags:
                    print(f"   warning: it was made with other flags ({made_with[0]}); delete {Path(made_with[0]).parent} "
                          f"to rebuild it with these:\n   {shlex.join(map(str, made_with[1]))}", flush=True)
                return
            why = f"{newer[0]} is newer" if newer else f"it was made with other flags ({made_with[0]})"
            print(f"== {name}: {product} is out of date: {why}; made again", flush=True)
        print(f"== {name}{': ' + header if header else ''}", flush=True)
        t0 = time.time()
        fn()
        if made_with:
            Path(made_with[0]).write_text(json.dumps(made_with[1]) + "\n")
        self.record(name, time.time() - t0)

    def run_together(self, jobs, launcher=None):
        """jobs: [(name, product, script, flags)]. Those whose product is missing run at once, each its own process."""
        todo = []
        for name, product, script, flags in jobs:
            if Path(product).exists():
                print(f"== {name}: {product} exists, skipped", flush=True)
            else:
                todo.append((name, command(script, flags, launcher)))
        if not todo:
            return
        print("== " + " and ".join(name for name, _ in todo) + " (in parallel)", flush=True)
        t0 = time.time()
        codes = [p.wait() for p in [subprocess.Popen(cmd) for _, cmd in todo]]
        if any(codes):
            sys.exit(" and ".join(name for name, _ in todo) + f" failed (exit codes {codes}); fix it and re-run "
                     "the same command to resume:\n" + "\n".join(f"  {shlex.join(cmd)}" for _, cmd in todo))
        for name, _ in todo:
            self.record(name, time.time() - t0)

    def record(self, name: str, seconds: float):
        self.timings[name] = round(seconds, 1)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.timings, indent=2) + "\n")
