"""Experiment trackers mirroring log.jsonl, which stays the source of truth: TensorBoard and Weights &
Biases (`--report-to tensorboard wandb`). training.Logger feeds them from rank 0 only.

    trackers = open_trackers(["tensorboard"], out_dir, name, config, resume_step)
    trackers.log(step, metrics); trackers.close()

A resumed run continues the same tracker run without repeating a step. TensorBoard writes to the same
<out>/tensorboard and marks the resumed step (purge_step), so readers drop what the killed run logged
past it. wandb resumes the run whose id is kept in <out>/wandb_run.json and resends, from log.jsonl, the
steps it may have lost with the killed process (wandb keeps one value per step).
Both libraries are optional: asking for one that is not installed is a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from fileio import atomic_write

REPORT_TO = ("none", "tensorboard", "wandb")


def _numbers(metrics: dict) -> dict[str, float]:
    """The metrics a tracker can plot: finite numbers (not bools, strings or lists)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, out_dir: Path, name: str, config: dict, resume_step: int, backlog: list[dict]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        fresh = not (out_dir / "tensorboard").exists()
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if fresh:  # a run resumed with --report-to tensorboard added: its earlier steps too, from log.jsonl
            self.writer.add_text("flags", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), 0)
            for line in backlog:
                self.log(line["step"], line)

    def log(self, step: int, metrics: dict):
        for key, value in _numbers(metrics).items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run loses no step it has logged

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out_dir: Path, name: str, config: dict, resume_step: int, backlog: list[dict]):
        try:
            import wandb
        except ImportError:
            raise ImportError("--report-to wandb needs the wandb package: pip install wandb") from None
        state_path = out_dir / "wandb_run.json"
        run_id = json.loads(state_path.read_text())["id"] if state_path.exists() else uuid.uuid4().hex[:12]
        atomic_write(state_path, json.dumps({"id": run_id}) + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "safe-rlhf-minimal"), id=run_id, resume="allow",
                              name=name, group=out_dir.resolve().parent.name, dir=str(out_dir), config=config)
        # wandb buffers what it writes, so a killed run may have kept less than it was sent. Resend, from
        # log.jsonl, every step from the one wandb says it is at (online: the server's; offline: 0, each
        # offline run file then holds the whole history, and `wandb sync` drops the steps it already has).
        start = self.run.step
        for line in backlog:
            if line["step"] >= start:
                self.log(line["step"], line)

    def log(self, step: int, metrics: dict):
        self.run.log({k: v for k, v in _numbers(metrics).items() if k != "step"}, step=step)

    def close(self):
        self.run.finish()


class Trackers:
    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, step: int, metrics: dict):
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def open_trackers(report_to, out_dir, name: str, config: dict, resume_step: int, backlog=()) -> Trackers:
    """The trackers `report_to` names (a list of REPORT_TO values; "none" or empty: none). backlog: the
    log.jsonl lines of the steps before resume_step, for a tracker that does not have them yet."""
    kinds = {"tensorboard": TensorBoard, "wandb": WandB}
    out_dir = Path(out_dir)
    return Trackers([kinds[k](out_dir, name, config, resume_step, list(backlog))
                     for k in dict.fromkeys(report_to or []) if k != "none"])
