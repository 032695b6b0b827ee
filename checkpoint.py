"""Training checkpoints: save, resume, refuse a resume with other flags.

    ckpt = Checkpointer(out_dir, d, args=args, run="an SFT run (sft.py)")
    ckpt.check()                                # before anything is loaded: a run still writing there,
                                                # another run's folder, other flags
    ckpt.check_data(train=train_set, ...)       # once tokenized: other data than the checkpoint's
    start_step, state = ckpt.resume(models)     # (0, {}) for a fresh run
    ckpt.save(step, models, state)              # models: name -> (model, optimizer, scheduler)

Sharded, through PyTorch's distributed checkpointing (DCP) with its safetensors storage
(torch.distributed.checkpoint.HuggingFaceStorageWriter / HuggingFaceStorageReader): every rank
writes its own shards of the weights and the optimiser state, in parallel, and reads back only
the slices its parameters need. No rank gathers a full model or a full optimiser state, and a
checkpoint written by N ranks resumes on any number of ranks, or in a plain process (DCP's
resharding: tensors are keyed by parameter name, each saved shard records its offsets in the full
tensor). Every rank must see the same <out> directory (a shared filesystem across nodes).

<out>/checkpoints/step_00000123/
    state.json          step, schedules, the script's state (lambda and its rule's state, the cost
                        window, data position, ...), the run (which script and objective or algorithm
                        made it), its flags, the sha256 of each tokenized data set, each
                        optimiser's non-tensor state
                        (param groups, AdamW's `step` counts), every file below with its size
    <name>/             the weights: shard-{rank + 1:05d}-model-{i:05d}-of-{n:05d}.safetensors (DCP's
                        names), each holding a rank's shards keyed by parameter name, with their
                        offsets in the full tensors (the safetensors metadata's DCP_SHARDING_INFO)
    <name>.optim/       the optimiser's tensors (exp_avg, exp_avg_sq), the same way, keyed
                        `state.<parameter name>.<key>`
    rng/rank_{rank:05d}.json   each rank's RNG states (torch, numpy, python, cuda), lists of ints

A rank's shards are split into files of about FILE_BYTES_PER_RANK (512 MiB): DCP's writer
serialises a whole file in memory before writing it (about twice its size), and the reader maps
one file at a time, so a rank's host memory holds at most about one file beyond its own state.

Nothing is unpickled on load: state.json and the RNG files are JSON; the tensors are read by
HuggingFaceStorageReader, whose metadata comes from the safetensors headers (JSON), not from the
pickled `.metadata` file of DCP's default FileSystemReader, and whose data comes from
safetensors.safe_open. (DCP's default load planner would torch.load non-tensor entries: none are
written, scalars go to state.json. Under torchrun, DCP and this module exchange their plans and
file lists between the run's own processes with torch.distributed's object collectives, which
pickle in memory; nothing read from disk is unpickled.)

Atomic: all ranks write into one temporary directory, `.tmp-step_00000123`; once they all have
(each reports its files to rank 0), rank 0 writes state.json, syncs, renames the directory into
place, then switches `latest` (a one-line file, replaced atomically), then removes old step
directories beyond `keep`. A kill at any moment leaves `latest` naming a complete checkpoint; a
save that fails (a full disk, a Ctrl-C) removes its temporary directory and leaves `latest` as it
was. On
resume, state.json is read first (the flags are checked before any tensor is read), then every file
it lists is checked (present, its size, a readable safetensors header): a damaged one is named,
with the way back (an older step directory). Checkpoints of the previous layout (full tensors,
`<name>.optim.pt`, rng.pt) are refused with a message rather than read with torch.load.

One run at a time: rank 0 holds an exclusive lock (flock) on <out>/.run.lock while the run lives, and
a second run given the same --out stops at `check()`, naming the process that holds it. The lock goes
with its process, however it ends (a SIGKILL included). It matters when torchrun is killed but its
workers are not (torchrun starts them in their own sessions): they keep writing, and a rerun would
resume beside them. Where the filesystem has no flock (some Lustre mounts), nothing is locked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cli
import fileio

FORMAT = "dcp-safetensors-v1"  # state.json's "format": the layout above
FILE_BYTES_PER_RANK = 512 * 2**20  # about this much of one rank's shards per file


# ----------------------------------------------------------------------------------------------
# RNG states as JSON


def _rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "numpy": keys.tolist(), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    has_gauss, gauss = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), int(state["numpy_pos"]),
                         int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# State dicts: tensors (sharded, to DCP) and everything else (to JSON)


def _is_sharded_tensor(x) -> bool:
    """What goes to the safetensors shards: every tensor but 0-dim plain ones (AdamW's `step`),
    which go to JSON (the safetensors storage writes tensors only, and a scalar is not sharded)."""
    return isinstance(x, torch.Tensor) and (x.ndim > 0 or hasattr(x, "full_tensor"))


def _split(tree, path: str = "") -> tuple[object, dict]:
    """(the JSON-able rest, {flat key: tensor}) of a nested state dict: tensors are replaced by
    {"tensor": key}, 0-dim ones by {"scalar": value, "dtype": ...}."""
    tensors = {}

    def walk(x, where):
        if isinstance(x, dict):
            return {str(k): walk(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}.{i}") for i, v in enumerate(x)]
        if _is_sharded_tensor(x):
            tensors[where] = x
            return {"tensor": where}
        if isinstance(x, torch.Tensor):
            return {"scalar": x.item(), "dtype": str(x.dtype).removeprefix("torch.")}
        return x

    return walk(tree, path), tensors


def _merge(template, saved, where: str = ""):
    """The state dict shaped like `template` (a fresh optimiser's, whose tensors DCP has just
    filled in place) with every non-tensor value from `saved` (what _split left for JSON)."""
    if isinstance(template, dict):
        keys = {str(k) for k in template}
        if not isinstance(saved, dict) or keys != set(saved):
            raise ValueError(f"the checkpoint's optimiser state at {where or 'top level'!r} has other entries "
                             f"than this run's: {sorted(set(saved) ^ keys) if isinstance(saved, dict) else saved}")
        return {k: _merge(v, saved[str(k)], f"{where}.{k}" if where else str(k)) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(template):
            raise ValueError(f"the checkpoint's optimiser state at {where!r} has another length than this run's")
        merged = [_merge(t, s, f"{where}.{i}") for i, (t, s) in enumerate(zip(template, saved))]
        return tuple(merged) if isinstance(template, tuple) else merged
    if _is_sharded_tensor(template):
        return template
    if isinstance(template, torch.Tensor):
        return torch.tensor(saved["scalar"], dtype=template.dtype, device=template.device)
    return saved


def _model_tensors(model) -> dict:
    """Parameter name -> the model's own tensor (a DTensor shard under FSDP2), each once: a tied
    output.weight is tok_embeddings.weight."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    aliases = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
               - {name for name, _ in model.named_parameters()})  # the same on every rank
    return {name: tensor for name, tensor in get_model_state_dict(model).items() if name not in aliases}


def _file_index(tensors: dict, world: int) -> dict[str, int]:
    """Tensor name -> file number (from 1): consecutive tensors share a file until it holds about
    FILE_BYTES_PER_RANK of each rank's shards. The same on every rank (from full shapes)."""
    index, file, size = {}, 1, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size() // world  # numel() of a DTensor: the full tensor's
        if size and size + nbytes > FILE_BYTES_PER_RANK:
            file, size = file + 1, 0
        index[name] = file
        size += nbytes
    return index


def _own_files(step_dir: Path, rank: int) -> dict[str, int]:
    """Relative path -> size of the files this rank wrote into step_dir: its RNG file and its
    shards (DCP's safetensors writer names rank r's files shard-{r + 1:05d}-...)."""
    mine = [f for f in step_dir.glob(f"*/shard-{rank + 1:05d}-*.safetensors")]
    mine.append(step_dir / "rng" / f"rank_{rank:05d}.json")
    return {str(f.relative_to(step_dir)): f.stat().st_size for f in mine}


def _save_tensors(directory: Path, tensors: dict, d):
    """Every rank writes its shards of `tensors` into `directory` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException

    writer = HuggingFaceStorageWriter(str(directory), fqn_to_index_mapping=_file_index(tensors, d.world),
                                      save_distributed=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save(tensors, storage_writer=writer, no_dist=not d.distributed)
        except CheckpointException as error:  # a BaseException wrapping each rank's own failure
            failure = next((f[0] if isinstance(f, tuple) else f for f in error.failures.values()), None)
            if isinstance(failure, OSError):  # a full disk, a read-only mount: the machine's, not a bug
                raise OSError(failure.errno, failure.strerror, failure.filename or str(directory)) from None
            raise


def _load_tensors(directory: Path, tensors: dict, d):
    """Fill `tensors` (this rank's shards) in place from the slices of the files in `directory`
    that overlap them, whatever number of ranks wrote them (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not d.distributed)


# ----------------------------------------------------------------------------------------------
# Damaged files


def _way_back(path: Path) -> str:
    return (f"If it is damaged, point {path.parent / 'latest'} at an older step directory to resume from there")


def data_fingerprint(examples) -> str:
    """sha256 of a tokenized data set: each example's fields (token id lists, counts, labels), in order."""
    digest = hashlib.sha256()
    for example in examples:
        values = [getattr(example, f.name) for f in dataclasses.fields(example)] \
            if dataclasses.is_dataclass(example) else [example]
        for value in values:
            ids = np.asarray(value, dtype=np.int64).ravel()
            digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return digest.hexdigest()


def _read_json(file: Path, step_dir: Path):
    try:
        return json.loads(file.read_text())
    except Exception as e:  # a damaged file: name it, and the way back
        raise ValueError(f"{file}: cannot be read ({type(e).__name__}: {e}). {_way_back(step_dir)}") from None


def _check_files(step_dir: Path, files: dict):
    """Every file state.json lists is there, whole (its size), and each safetensors header reads:
    before DCP's own, anonymous errors (or a silently smaller tensor) could arise."""
    from safetensors import safe_open

    for name, size in files.items():
        file = step_dir / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from this checkpoint. {_way_back(step_dir)}")
        actual = file.stat().st_size
        if actual != size:
            raise ValueError(f"{file}: cannot be read: not a readable safetensors file ({actual} bytes where "
                             f"{size} were written: truncated or overwritten). {_way_back(step_dir)}"
                             if file.suffix == ".safetensors" else
                             f"{file}: cannot be read ({actual} bytes where {size} were written). {_way_back(step_dir)}")
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as e:
                raise ValueError(f"{file}: cannot be read: not a readable safetensors file ({e}). "
                                 f"{_way_back(step_dir)}") from None


# ----------------------------------------------------------------------------------------------


class Checkpointer:
    # Flags a resumed run may change; any other difference from the checkpoint's flags is refused
    # (a different --lr, batch size, data, objective or algorithm would silently make another run).
    # --recipe only fills the flags left unset, and those values are compared one by one.
    RESUMABLE_CHANGES = {"out", "eval_every", "save_every", "max_steps", "epochs", "device", "precision",
                         "activation_checkpointing", "cpu_offload", "offload_frozen", "save_dtype", "recipe",
                         "report_to", "decode"}

    def __init__(self, out_dir, d, keep: int = 2, args=None, run: str | None = None):
        self.root = Path(out_dir) / "checkpoints"
        self.d, self.keep = d, keep
        # The run's flags, as JSON would give them back, saved with every checkpoint.
        self.args = json.loads(json.dumps(vars(args), default=str)) if args is not None else None
        self.run = run  # what made it, in words ("a reward-model run (train_score.py --objective reward)")
        self.data: dict[str, str] = {}  # data set name -> sha256 of its tokens (check_data), saved with each step
        cli.PROGRESS.saved = None

    def latest(self, quiet: bool = False) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            # `latest` lost (deleted by hand, say) beside complete step directories: use the newest
            # rather than start over and rotate them away.
            complete = sorted(p for p in self.root.glob("step_*") if (p / "state.json").is_file())
            if complete and not quiet:
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
        cli.PROGRESS.saved = state["step"]
        return state["step"], state

    def check(self):
        """What resume() will refuse, said before any data or model is loaded: a run still writing to
        the folder, a folder of another run (another script, objective or algorithm), other flags, a
        layout this version does not read. Every rank calls it."""
        holder = fileio.lock_out_dir(self.root.parent) if self.d.is_main else None
        if self.d.all_reduce_sum(float(holder is not None)).item():  # every rank stops, not only rank 0
            raise ValueError(f"{self.root.parent} is in use by another run that is still running"
                             + (f" ({holder})" if holder else "") + ": "
                             "wait for it to end or stop it (after killing torchrun, kill its workers too: "
                             "they run in their own sessions), then run this again")
        latest = self.latest(quiet=True)
        if latest is not None:
            self.check_state(latest, _read_json(latest / "state.json", latest))

    def check_data(self, **data_sets):
        """Refuse to resume on other data than the latest checkpoint's: the same flags can name a file
        edited since, a Hub data set at a branch that moved, or a tokenizer file replaced, and the
        resumed steps would train (and evaluate) on other examples than the run they continue. Each
        data set (name=tokenized examples; None skipped) is hashed, ids and labels in order, and the
        hashes go into every checkpoint saved after. Checkpoints without hashes (older) are not checked."""
        self.data = {name: data_fingerprint(examples) for name, examples in data_sets.items() if examples is not None}
        latest = self.latest(quiet=True)
        saved = _read_json(latest / "state.json", latest).get("data") if latest is not None else None
        if not saved:
            return
        changed = sorted(name for name in saved.keys() | self.data.keys() if saved.get(name) != self.data.get(name))
        if changed:
            raise ValueError(f"{latest} was trained on other data: the {', '.join(changed)} set(s) now tokenize to "
                             "other examples than the checkpoint's (a data file edited, a Hub data set's branch "
                             "moved, another tokenizer); pass the same data to resume (a Hub id @revision pins "
                             "it), or use a new --out for a new run")

    def check_state(self, path: Path, state: dict):
        """Refuse to resume the checkpoint at `path` (its state.json: `state`) if another run made it,
        or the same run with flags other than the ones it was made with, or an older layout."""
        if state.get("run") and self.run and state["run"] != self.run:
            raise ValueError(f"{self.root.parent} holds {state['run']}, not {self.run}: pass another --out for "
                             f"this run (or resume that one with its own command)")
        self.check_args(path, state)
        if state.get("format") != FORMAT:
            raise ValueError(f"{path} is in an older checkpoint layout (full tensors in <name>/ and <name>.optim.pt, "
                             f"read with torch.load), which this version no longer reads (it never unpickles): "
                             f"resume it with the version that wrote it, or use a new --out")

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
        """models: name -> (model, optimizer or None, scheduler or None). Every rank calls this;
        each writes its own shards."""
        d = self.d
        name = f"step_{step:08d}"
        tmp = self.root / f".tmp-{name}"
        if d.is_main:
            for stale in self.root.glob(".tmp-step_*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        try:
            files, schedules, optimizers = self._write(tmp, models)
            if d.is_main:
                record = {"format": FORMAT, "step": step, "world": d.world, "schedules": schedules, **state,
                          **({"run": self.run} if self.run else {}), **({"args": self.args} if self.args else {}),
                          **({"data": self.data} if self.data else {}), "optimizers": optimizers, "files": dict(sorted(files.items()))}
                (tmp / "state.json").write_text(json.dumps(record, indent=1))
                fileio.fsync_tree(tmp)  # on disk before `latest` names them
        except BaseException:  # a full disk, a Ctrl-C: free what this step wrote; `latest` still names the last one
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if d.is_main:
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fileio.atomic_write(self.root / "latest", name + "\n")
            for old in sorted(self.root.glob("step_*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()
        cli.PROGRESS.saved = step

    def _write(self, tmp: Path, models: dict) -> tuple[dict, dict, dict]:
        """Every rank's shards, RNG state, and the file list (on rank 0: every rank's); the schedules'
        and optimisers' non-tensor state for state.json."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        d = self.d
        fileio.atomic_write(tmp / "rng" / f"rank_{d.rank:05d}.json", json.dumps(_rng_state()))
        schedules, optimizers = {}, {}
        for key, (model, optimizer, scheduler) in models.items():
            _save_tensors(tmp / key, _model_tensors(model), d)
            if optimizer is not None:
                # Keyed by parameter name, each rank's shards: resumable on any number of ranks.
                rest, tensors = _split(get_optimizer_state_dict(model, optimizer))
                _save_tensors(tmp / f"{key}.optim", tensors, d)
                optimizers[key] = rest
                del tensors
            if scheduler is not None:
                schedules[key] = scheduler.state_dict()
        # Every rank's files are written (and synced: DCP's writer fsyncs each). Each rank lists its
        # own, as it sees them: another node's directory listing could lag on a network filesystem.
        files = _own_files(tmp, d.rank)
        if d.distributed:
            everyone = [None] * d.world if d.is_main else None
            dist.gather_object(files, everyone, dst=0)
            files = {name: size for part in everyone or [] for name, size in part.items()}
        return files, schedules, optimizers

    def load(self, path: Path, models: dict) -> dict:
        """Restore weights, optimisers, schedules and this rank's RNG from `path`; return state.json."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        d = self.d
        state = _read_json(path / "state.json", path)
        self.check_state(path, state)  # before any tensor is read
        _check_files(path, state["files"])
        for key, (model, optimizer, scheduler) in models.items():
            _load_tensors(path / key, _model_tensors(model), d)  # into the parameters themselves
            if optimizer is not None:
                # A fresh optimiser's state dict (DCP's helper initialises it) as the template: its
                # tensors are this rank's shards, filled in place; the rest comes from state.json.
                template = get_optimizer_state_dict(model, optimizer)
                _, tensors = _split(template)
                _load_tensors(path / f"{key}.optim", tensors, d)
                set_optimizer_state_dict(model, optimizer, _merge(template, state["optimizers"][key]))
                del template, tensors
            if scheduler is not None:
                scheduler.load_state_dict(state["schedules"][key])
        rng = path / "rng" / f"rank_{d.rank:05d}.json"
        if rng.is_file():  # a rank the saving run did not have keeps its seeded state
            _set_rng_state(_read_json(rng, path))
        return state
