"""Training checkpoints: save, resume, refuse a resume with other flags.

    ckpt = Checkpointer(out_dir, d, args=args)
    start_step, state = ckpt.resume(models)     # (0, {}) for a fresh run
    ckpt.save(step, models, state)              # models: name -> (model, optimizer, scheduler)

<out>/checkpoints/step_00000123/ holds, for each named model, an HF-format `<name>/` and
`<name>.optim.pt`, plus `state.json` (step, schedules, flags, whatever the script adds: lambda and
its state, the cost window, ...) and `rng.pt` (every rank's RNG). Each step directory is built
under a temporary name and renamed into place; then `latest` (a one-line file, replaced
atomically) points at it; then old step directories beyond `keep` are removed. A kill at any
moment leaves `latest` naming a complete checkpoint.

Optimiser states are full (unsharded) tensors keyed by parameter name, so a run can resume on a
different number of ranks, or in a plain process; they are read with torch.load(weights_only=True),
never unpickling code. Weights are read back through hf_io.full_state_dict, the path every model load takes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import hf_io


def _rng_state() -> dict:
    _, keys, pos, _, _ = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _read_checkpoint_file(file: Path, read):
    try:
        return read(file)
    except Exception as e:  # a damaged file: name it, and the way back
        raise ValueError(f"{file}: cannot be read ({type(e).__name__}: {e}). If it is damaged, point "
                         f"{file.parent.parent / 'latest'} at an older step directory to resume from there") from None


class Checkpointer:
    # Flags a resumed run may change; any other difference from the checkpoint's flags is refused
    # (a different --lr, batch size, data, objective or algorithm would silently make another run).
    RESUMABLE_CHANGES = {"out", "eval_every", "save_every", "max_steps", "epochs", "device", "precision",
                         "activation_checkpointing", "cpu_offload", "offload_frozen"}

    def __init__(self, out_dir, d, keep: int = 2, args=None):
        self.root = Path(out_dir) / "checkpoints"
        self.d, self.keep = d, keep
        # The run's flags, as JSON would give them back, saved with every checkpoint.
        self.args = json.loads(json.dumps(vars(args), default=str)) if args is not None else None

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            # `latest` lost (deleted by hand, say) beside complete step directories: use the newest
            # rather than start over and rotate them away.
            complete = sorted(p for p in self.root.glob("step_*") if (p / "state.json").is_file())
            if complete:
                self.d.print(f"{pointer} is missing; resuming from the newest complete checkpoint, {complete[-1]}")
            return complete[-1] if complete else None
        name = pointer.read_text().strip()
        if not name:
            raise FileNotFoundError(f"{pointer} is empty; write the name of a complete step directory into it")
        path = self.root / name
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def resume(self, models: dict) -> tuple[int, dict]:
        """(step to continue after, saved state) from the latest checkpoint, or (0, {}) for a fresh run."""
        latest = self.latest()
        if latest is None:
            return 0, {}
        state = self.load(latest, models)
        self.d.print(f"resumed from {latest} at step {state['step']}")
        return state["step"], state

    def check_args(self, path: Path, state: dict):
        """Refuse to resume the checkpoint at `path` (its state.json: `state`) with flags other than
        the ones it was made with."""
        saved = state.get("args")
        if saved is None or self.args is None:
            return
        changed = sorted(k for k in saved.keys() | self.args.keys()
                         if k not in self.RESUMABLE_CHANGES and saved.get(k) != self.args.get(k))
        if changed:
            lines = "\n".join(f"  --{k.replace('_', '-')}: {saved.get(k)!r} in the checkpoint, {self.args.get(k)!r} now"
                               for k in changed)
            raise ValueError(f"{path} was made with other flags:\n{lines}\nPass the same values to resume, or "
                             f"use a new --out for a new run.")

    def save(self, step: int, models: dict, state: dict):
        """models: name -> (model, optimizer or None, scheduler or None). Every rank calls this."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        d = self.d
        name = f"step_{step:08d}"
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        rng = [None] * d.world
        if d.distributed:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        tmp = self.root / f".tmp-{name}"
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        schedules = {}
        for key, (model, optimizer, scheduler) in models.items():
            model.save_pretrained(tmp / key)  # collective under FSDP; rank 0 writes
            if optimizer is not None:
                # Keyed by parameter name, sharded or not: a plain run resumes under torchrun and back.
                osd = get_optimizer_state_dict(model, optimizer, options=full)  # a full copy on rank 0 only
                if d.is_main:
                    torch.save(osd, tmp / f"{key}.optim.pt")
                del osd
            if scheduler is not None:
                schedules[key] = scheduler.state_dict()
        if d.is_main:
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "schedules": schedules, **state,
                                                        **({"args": self.args} if self.args else {})}, indent=1))
            hf_io.fsync_tree(tmp)  # on disk before `latest` names them
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            hf_io.atomic_write(self.root / "latest", name + "\n")
            for old in sorted(self.root.glob("step_*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()

    def load(self, path: Path, models: dict) -> dict:
        """Restore weights, optimisers, schedules and this rank's RNG from `path`; return state.json."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        d = self.d
        state = _read_checkpoint_file(path / "state.json", lambda f: json.loads(f.read_text()))
        self.check_args(path, state)  # before any weight is read
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for key, (model, optimizer, scheduler) in models.items():
            weights = None
            if d.is_main or not d.distributed:
                weights = hf_io.full_state_dict(hf_io.describe(path / key, model.head))
            if d.distributed:
                set_model_state_dict(model, weights or {}, options=opts)
            else:
                model.load_state_dict(weights)
            if optimizer is not None:
                osd = {}
                if d.is_main or not d.distributed:  # mmap: pages in as set_optimizer_state_dict reads
                    osd = _read_checkpoint_file(path / f"{key}.optim.pt",
                                                lambda f: torch.load(f, weights_only=True, mmap=True))
                set_optimizer_state_dict(model, optimizer, osd,
                                         options=opts if d.distributed else StateDictOptions(full_state_dict=True))
                del osd
            if scheduler is not None:
                scheduler.load_state_dict(state["schedules"][key])
        rng = torch.load(path / "rng.pt", weights_only=True)
        if d.rank < len(rng):
            _set_rng_state(rng[d.rank])
        return state
