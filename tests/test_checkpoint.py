"""checkpoint.py's sharded, pickle-free checkpoints and hf_io.save_pretrained's streaming writer.

In one process (fast): a save/resume round trip with pickle and torch.load made to raise, damaged
and missing files named, a kill between the rename and the `latest` switch, a disk that fills up
halfway through a save, a Ctrl-C while saving, every file synced before the rename, old checkpoints
rotated, an older layout refused, sharded HF output loadable by transformers; fileio's atomic file and
directory writes.

Whole scripts (slow): sft.py written by 2 ranks (killed by SIGKILL while saving its last checkpoint)
resumes on 1 and on 4 ranks, written by 4 resumes on 2; ppo_lag.py (three optimisers, lambda's
state) written by 2 resumes in one process; each with the losses and weights of an uninterrupted run.
"""

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fileio
import hf_io
import checkpoint
import training
from checkpoint import Checkpointer
from model import ModelArgs, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ppo import checkpoints, ppo_args  # noqa: E402,F401  (checkpoints: the tiny PPO models, a fixture)
from test_stages import ROOT, assert_same_weights, descendants, log_of, run  # noqa: E402

PLAIN = training.Dist(0, 1, 0, torch.device("cpu"), None)


# ------------------------------------------------------------------------------------------------
# In one process, through the Checkpointer API


def tiny_run(seed=0):
    """A tiny score model (norms, a [1]-sized bias), AdamW and its schedule: name -> (model, opt, sched)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, hidden_dim=64), head="score")
    model.init_weights(seed=seed)
    optimizer, scheduler = training.build_optimizer(model, 1e-2, 0.1, warmup_steps=1, total_steps=10)
    return {"model": (model, optimizer, scheduler)}


def train(models, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for model, optimizer, scheduler in models.values():
            model(torch.randint(0, 64, (2, 8), generator=g)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()


def no_pickle(monkeypatch) -> list:
    """pickle.load/loads/Unpickler and torch.load raise, and are recorded (in case a caller
    swallowed the error and fell back to something else)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the checkpoint load path unpickled something")

    class Unpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    monkeypatch.setattr(torch, "load", refuse)
    return calls


def test_round_trip_without_pickle(tmp_path, monkeypatch):
    saved = tiny_run()
    train(saved, 3)
    Checkpointer(tmp_path, PLAIN).save(3, saved, {"lambda": 0.5, "window": [1.0, 2.0]})
    after_save = torch.rand(3), np.random.rand(), random.random()
    step_dir = tmp_path / "checkpoints" / "step_00000003"
    assert not list(step_dir.rglob("*.pt")) and not list(step_dir.rglob(".metadata"))  # no pickles written

    torch.manual_seed(123)  # other RNG states, other weights: the resume must restore all of them
    np.random.seed(123)
    random.seed(123)
    resumed = tiny_run(seed=7)
    unpickled = no_pickle(monkeypatch)
    step, state = Checkpointer(tmp_path, PLAIN).resume(resumed)
    monkeypatch.undo()
    assert not unpickled
    assert step == 3 and state["lambda"] == 0.5 and state["window"] == [1.0, 2.0]
    assert torch.equal(torch.rand(3), after_save[0])
    assert (np.random.rand(), random.random()) == after_save[1:]
    (a_model, a_opt, a_sched), (b_model, b_opt, b_sched) = saved["model"], resumed["model"]
    for (name, p), q in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(p, q), name
    sa, sb = a_opt.state_dict(), b_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key]), (i, key)
    assert a_sched.state_dict() == b_sched.state_dict()
    # ... so the next steps are the same.
    train(saved, 2, seed=5)
    train(resumed, 2, seed=5)
    for (name, p), q in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_rng_states_round_trip(tmp_path):
    models = tiny_run()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.normal()  # numpy caches the second Gaussian of a pair: part of its state
    random.gauss(0, 1)
    Checkpointer(tmp_path, PLAIN).save(1, models, {})
    expected = torch.rand(4), np.random.normal(size=3), random.gauss(0, 1), random.random()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    Checkpointer(tmp_path, PLAIN).resume(tiny_run())
    got = torch.rand(4), np.random.normal(size=3), random.gauss(0, 1), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]
    rng = json.loads((tmp_path / "checkpoints" / "step_00000001" / "rng" / "rank_00000.json").read_text())
    assert isinstance(rng["torch"], list) and isinstance(rng["numpy"], list)  # JSON, not pickles


def test_damaged_and_missing_files_are_named(tmp_path):
    models = tiny_run()
    train(models, 1)
    Checkpointer(tmp_path, PLAIN).save(1, models, {})
    step_dir = tmp_path / "checkpoints" / "step_00000001"
    shard = step_dir / "model.optim" / "shard-00001-model-00001-of-00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])  # truncated (a full disk, a copy cut short)
    with pytest.raises(ValueError, match=r"model\.optim/shard-00001-model-00001-of-00001\.safetensors: cannot be read: "
                                         r"not a readable safetensors file .*truncated.*point .*latest at an older "
                                         r"step directory"):
        Checkpointer(tmp_path, PLAIN).resume(tiny_run())
    shard.write_bytes(whole[:8] + b"\xff" * (len(whole) - 8))  # the right size, a garbled header
    with pytest.raises(ValueError, match=r"shard-00001-model-00001-of-00001\.safetensors: cannot be read: not a "
                                         r"readable safetensors file"):
        Checkpointer(tmp_path, PLAIN).resume(tiny_run())
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.optim/shard-00001-model-00001-of-00001\.safetensors is "
                                                r"missing from this checkpoint"):
        Checkpointer(tmp_path, PLAIN).resume(tiny_run())
    (step_dir / "state.json").write_text('{"step": 1, ')
    with pytest.raises(ValueError, match=r"state\.json: cannot be read.*older step directory"):
        Checkpointer(tmp_path, PLAIN).resume(tiny_run())


def test_kill_before_latest_switch_and_rotation(tmp_path, monkeypatch):
    models = tiny_run()
    ckpt = Checkpointer(tmp_path, PLAIN)
    train(models, 1)
    ckpt.save(1, models, {"at": 1})
    train(models, 1)
    atomic_write = fileio.atomic_write

    def die_before_latest(path, content):
        if Path(path).name == "latest":
            raise KeyboardInterrupt("killed between the rename and the switch of latest")
        atomic_write(path, content)

    monkeypatch.setattr(fileio, "atomic_write", die_before_latest)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, models, {"at": 2})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000001\n" and (root / "step_00000002" / "state.json").is_file()
    step, state = Checkpointer(tmp_path, PLAIN).resume(tiny_run())
    assert step == 1 and state["at"] == 1  # `latest` decides, not the newest directory
    for step in (2, 3, 4):  # saving step 2 again replaces the directory; only the last two are kept
        ckpt.save(step, models, {"at": step})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]

    # A kill while the shards are written leaves a temporary directory, never taken for a checkpoint
    # and removed by the next save.
    (root / ".tmp-step_00000005" / "model").mkdir(parents=True)
    assert Checkpointer(tmp_path, PLAIN).resume(tiny_run())[0] == 4
    ckpt.save(6, models, {})
    assert not list(root.glob(".tmp-*"))


def test_lost_latest_skips_an_incomplete_newest_step(tmp_path, capsys):
    """Without `latest`, the newest step directory that has its state.json is resumed: a step directory
    without one (a save replacing it, or a rotation, killed halfway through its removal) is passed over."""
    models = tiny_run()
    ckpt = Checkpointer(tmp_path, PLAIN)
    for step in (1, 2):
        train(models, 1)
        ckpt.save(step, models, {"at": step})
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    (root / "step_00000003" / "model").mkdir(parents=True)  # no state.json
    assert Checkpointer(tmp_path, PLAIN).latest() == root / "step_00000002"
    step, state = Checkpointer(tmp_path, PLAIN).resume(tiny_run(seed=3))
    assert step == 2 and state["at"] == 2
    assert "resuming from the newest complete checkpoint" in capsys.readouterr().out
    shutil.rmtree(root / "step_00000001")
    shutil.rmtree(root / "step_00000002")
    assert Checkpointer(tmp_path, PLAIN).latest() is None  # only an incomplete one: a fresh run


# Flags that make another run: a resume with any of them changed is refused (hand-written, not read
# from checkpoint.py). And flags that only say how long, where or how the same run goes on.
REFUSED_CHANGES = {"data": ("a.jsonl", "b.jsonl"), "eval_data": (None, "e.jsonl"), "seed": (0, 1), "lr": (1e-3, 2e-3),
                   "batch_size": (8, 16), "max_length": (96, 128), "template": ("safe_rlhf", "chat"),
                   "model": ("tiny", "other"), "eval_fraction": (0.05, 0.1), "data_seed": (0, 1)}
ALLOWED_CHANGES = {"max_steps": (2, 4), "epochs": (1, 2), "out": ("a", "b"), "eval_every": (1, 5),
                   "save_every": (1, 2), "report_to": (None, ["tensorboard"]),
                   # where and how the same run is computed or saved: a resume may move it to a GPU, to bf16, ...
                   "device": ("auto", "cpu"), "precision": ("auto", "bf16"), "activation_checkpointing": (None, True),
                   "cpu_offload": (False, True), "offload_frozen": (False, True), "save_dtype": ("auto", "bfloat16"),
                   "decode": ("auto", "eager"), "recipe": (None, "tiny")}


def run_flags(**changed):
    import argparse

    flags = {k: v[0] for k, v in {**REFUSED_CHANGES, **ALLOWED_CHANGES}.items()}
    return argparse.Namespace(**{**flags, **changed})


def test_resume_refuses_each_flag_that_makes_another_run(tmp_path):
    models = tiny_run()
    Checkpointer(tmp_path, PLAIN, args=run_flags()).save(1, models, {})
    for flag, (_, other) in REFUSED_CHANGES.items():
        with pytest.raises(ValueError, match=rf"--{flag.replace('_', '-')}: .* in the checkpoint, .* now"):
            Checkpointer(tmp_path, PLAIN, args=run_flags(**{flag: other})).check()
    Checkpointer(tmp_path, PLAIN, args=run_flags(**{k: v[1] for k, v in ALLOWED_CHANGES.items()})).check()
    Checkpointer(tmp_path, PLAIN, args=run_flags()).check()


class _FillingStream:
    """A file whose disk fills up: writes go through until `room` bytes (shared by every file of the
    save) are used, then the one that does not fit is written in part and raises ENOSPC."""

    def __init__(self, stream, room: list):
        self.stream, self.room = stream, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room[0]:
            self.stream.write(data[:self.room[0]])
            self.room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def full_disk(budget: int):
    """Checkpoint shards (written through DCP's FileSystem streams) fail with ENOSPC once `budget`
    bytes are written: a disk that fills up halfway through a save."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    create_stream, room = FileSystem.create_stream, [budget]

    @contextlib.contextmanager
    def filling(self, path, mode):
        with create_stream(self, path, mode) as stream:
            yield _FillingStream(stream, room) if "w" in mode else stream

    with mock.patch.object(FileSystem, "create_stream", filling):
        yield


def tree_hashes(root: Path) -> dict:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*"))
            if f.is_file()}


def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path):
    models = tiny_run()
    ckpt = Checkpointer(tmp_path, PLAIN)
    train(models, 1)
    ckpt.save(1, models, {"at": 1})
    root = tmp_path / "checkpoints"
    before = tree_hashes(root)
    size = sum((root / "step_00000001" / f).stat().st_size for f in json.loads(
        (root / "step_00000001" / "state.json").read_text())["files"])
    train(models, 1)
    with full_disk(budget=size // 2), pytest.raises(OSError) as error:
        ckpt.save(2, models, {"at": 2})
    assert error.value.errno == errno.ENOSPC and ".tmp-step_00000002" in error.value.filename
    assert tree_hashes(root) == before  # `latest` still names step 1, byte for byte; nothing of step 2 is left
    step, state = Checkpointer(tmp_path, PLAIN).resume(tiny_run(seed=3))
    assert step == 1 and state["at"] == 1
    ckpt.save(2, models, {"at": 2})  # space freed: the next save goes through
    assert (root / "latest").read_text() == "step_00000002\n"


def fsync_spy(monkeypatch) -> list:
    """os.fsync records (path, bytes on disk at that moment) of every file it syncs (Linux: /proc/self/fd)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name a synced file")
    synced, fsync = [], os.fsync

    def spy(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path, path.read_bytes()))
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_every_file_of_a_step_is_synced_under_its_temporary_name(tmp_path, monkeypatch):
    """A power cut right after the rename must not leave `latest` naming a step whose state.json (or any
    other file) never reached the disk: each is fsynced, with its final bytes, before the rename."""
    models = tiny_run()
    synced = fsync_spy(monkeypatch)
    rename, at_rename = Path.rename, {}

    def spy_rename(self, target):
        at_rename[Path(target).name] = {p.relative_to(self): data for p, data in synced
                                        if p.is_relative_to(self) and p.exists()}  # not atomic_write's siblings
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", spy_rename)
    Checkpointer(tmp_path, PLAIN).save(1, models, {"at": 1})
    monkeypatch.undo()
    step_dir = tmp_path / "checkpoints" / "step_00000001"
    on_disk = {f.relative_to(step_dir): f.read_bytes() for f in step_dir.rglob("*") if f.is_file()}
    assert Path("state.json") in on_disk and Path("rng/rank_00000.json") in on_disk
    assert at_rename["step_00000001"] == on_disk


def test_ctrl_c_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # A KeyboardInterrupt (not an Exception) halfway through a save: its temporary directory is removed
    # at once, and `latest` and the last checkpoint stay as they were, byte for byte.
    models = tiny_run()
    ckpt = Checkpointer(tmp_path, PLAIN)
    ckpt.save(1, models, {"at": 1})
    root = tmp_path / "checkpoints"
    before = tree_hashes(root)
    save = checkpoint._save_tensors

    def interrupted(directory, tensors, d):
        save(directory, tensors, d)
        if directory.name == "model.optim":
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "_save_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, models, {"at": 2})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert tree_hashes(root) == before


def test_a_shard_of_another_size_than_written_is_refused(tmp_path):
    # Bytes appended to a shard (a copy over an old file, another run's file): still a readable
    # safetensors header, but not the file that was written, so it is named rather than loaded.
    models = tiny_run()
    Checkpointer(tmp_path, PLAIN).save(1, models, {})
    shard = tmp_path / "checkpoints" / "step_00000001" / "model" / "shard-00001-model-00001-of-00001.safetensors"
    written = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ValueError, match=rf"shard-00001-model-00001-of-00001\.safetensors: cannot be read: .*\("
                                         rf"{written + 64} bytes where {written} were written"):
        Checkpointer(tmp_path, PLAIN).resume(tiny_run())


def test_atomic_write_syncs_then_replaces_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "new" / "latest"
    fileio.atomic_write(target, "step_00000001\n")
    synced = fsync_spy(monkeypatch)
    fileio.atomic_write(target, b"step_00000002\n")
    # the new text was synced in a sibling, then renamed over the file: never the file itself, half-written
    assert [(p.parent, p.name.startswith(".latest.tmp-"), data) for p, data in synced] == \
        [(target.parent, True, b"step_00000002\n")]
    assert target.read_bytes() == b"step_00000002\n"

    def failing_fsync(fd):  # a full disk or an I/O error reported at fsync (NFS does)
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as error:
        fileio.atomic_write(target, "step_00000003\n")
    monkeypatch.undo()
    assert error.value.errno == errno.EIO and error.value.filename == str(target)  # named: the message says which file
    assert [p.name for p in target.parent.iterdir()] == ["latest"]  # no temporary sibling left behind
    assert target.read_bytes() == b"step_00000002\n"


def test_atomic_directory_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    with fileio.atomic_directory(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    synced = fsync_spy(monkeypatch)
    with fileio.atomic_directory(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    monkeypatch.undo()
    # every file synced under the temporary name, with its bytes; the old version and the temporary gone
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-")
    assert sorted((p.relative_to(tmp).as_posix(), data) for p, data in synced) == [("sub/config.json", b"{}"),
                                                                                  ("weights.bin", b"new")]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (folder / "weights.bin").read_bytes() == b"new" and (folder / "sub" / "config.json").read_text() == "{}"

    with pytest.raises(OSError) as error:  # a failure while writing: the old folder stays as it was
        with fileio.atomic_directory(folder) as tmp:
            (tmp / "weights.bin").write_bytes(b"ha")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert error.value.filename == str(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (folder / "weights.bin").read_bytes() == b"new"


def test_older_layout_is_refused(tmp_path):
    step_dir = tmp_path / "checkpoints" / "step_00000002"
    step_dir.mkdir(parents=True)
    (step_dir / "state.json").write_text(json.dumps({"step": 2, "schedules": {}}))
    (step_dir / "model.optim.pt").write_bytes(b"PK")
    with pytest.raises(ValueError, match="older checkpoint layout.*never unpickles"):
        Checkpointer(tmp_path, PLAIN).resume(tiny_run())


def test_save_pretrained_streams_hf_shards(tmp_path):
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, hidden_dim=64, tie_embeddings=True))
    model.init_weights(seed=0)
    hf_io.save_pretrained(model, tmp_path / "one")
    hf_io.save_pretrained(model, tmp_path / "many", max_shard_size=20_000, extra_files=[tmp_path / "one" / "config.json"])
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    # total_size: the bytes of every stored tensor (fp32: 4 a value), counted here
    assert index["metadata"]["total_size"] == 4 * sum(t.numel() for k, t in model.state_dict().items()
                                                      if k != "output.weight")
    # each shard filled up to the limit, in the model's order: none could have taken the next one's first tensor
    per_file = {}
    for key, tensor in model.state_dict().items():
        if key != "output.weight":
            per_file.setdefault(index["weight_map"][hf_io.hf_name(key)], []).append(4 * tensor.numel())
    for this, following in zip([per_file[f] for f in files], [per_file[f] for f in files[1:]]):
        assert sum(this) <= 20_000 < sum(this) + following[0]
    for name in ("one", "many"):
        state = hf_io.full_state_dict(hf_io.describe(tmp_path / name))
        for key, tensor in model.state_dict().items():
            assert torch.equal(state[key], tensor), (name, key)
    with safe_open(tmp_path / "one" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "many")
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(hf(ids).logits, -1), torch.log_softmax(model(ids), -1),
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Whole scripts, in subprocesses: N ranks write, M ranks resume


SFT = ["--max-steps", "3", "--batch-size", "16", "--micro-batch-size", "4", "--eval-every", "3",
       "--save-every", "1", "--max-length", "96"]


def rewind_to(out, step, final="model"):
    """As if the run had died after checkpoint `step`: later checkpoints and the final model gone."""
    for later in (out / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    shutil.rmtree(out / final, ignore_errors=True)
    (out / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


def run_killed_in_save(script, args, nproc, kill_step, tmp_path):
    """Run `script` under torchrun with rank 1 SIGKILLed inside checkpoint `kill_step`'s save, right
    after its shards of the first model are written (rank 0 then waits in a collective until torchrun
    tears it down)."""
    wrapper = tmp_path / "die_in_save.py"
    wrapper.write_text(f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import checkpoint
save = checkpoint._save_tensors
def save_then_die(directory, tensors, d):
    save(directory, tensors, d)
    if directory.parent.name == ".tmp-step_{kill_step:08d}" and d.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._save_tensors = save_then_die
sys.argv = [{str(ROOT / script)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(wrapper), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=300) != 0, "the run was not killed"
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def shard_shapes(directory) -> dict:
    """File -> {tensor: shape} of a DCP safetensors directory."""
    shapes = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            shapes[file.name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes


@pytest.mark.slow
def test_sft_resumes_on_other_world_sizes(tmp_path, synthetic_data):
    args = [*SFT, "--synthetic-dir", str(synthetic_data.dir)]
    # The uninterrupted reference, on 4 ranks; its step-2 checkpoint resumes on 2.
    straight = tmp_path / "w4"
    run("sft.py", [*args, "--out", str(straight)], nproc=4)
    reference = log_of(straight)
    shapes = shard_shapes(straight / "checkpoints" / "step_00000002" / "model")
    assert len(shapes) == 4  # one file per rank, each with its quarter of every tensor
    assert {s["tok_embeddings.weight"] for s in shapes.values()} == {(1024 // 4, 128)}

    # 2 ranks, rank 1 SIGKILLed while writing the step-3 checkpoint: `latest` still names step 2; the
    # half-written step never appears under its own name (what is left of it stays under its temporary
    # name, unless rank 0 removed it when its collective failed).
    killed = tmp_path / "w2"
    run_killed_in_save("sft.py", [*args, "--out", str(killed)], 2, 3, tmp_path)
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002\n"
    assert not (ckpts / "step_00000003").exists() and not (killed / "model").exists()
    shutil.copytree(killed, tmp_path / "w2to4")
    shutil.copytree(straight, tmp_path / "w4to2")
    rewind_to(tmp_path / "w4to2", 2)

    for out, nproc in ((killed, 1), (tmp_path / "w2to4", 4), (tmp_path / "w4to2", 2)):
        result = run("sft.py", [*args, "--out", str(out)], nproc=nproc)
        assert "resumed from" in result.stdout and "step_00000002" in result.stdout, out
        log = log_of(out)
        assert [r["step"] for r in log] == [1, 2, 3], out
        assert log[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-5), out
        assert log[-1]["grad_norm"] == pytest.approx(reference[-1]["grad_norm"], rel=1e-4), out
        assert log[-1]["eval_loss"] == pytest.approx(reference[-1]["eval_loss"], rel=1e-5), out
        assert_same_weights(out / "model", straight / "model", rtol=1e-5)
        assert not list((out / "checkpoints").glob(".tmp-*")), out


@pytest.mark.slow
def test_ppo_written_by_two_ranks_resumes_in_one_process(tmp_path, checkpoints):  # noqa: F811
    # Three optimisers (actor and two critics), their schedules, lambda and its cost window.
    extra = ["--max-steps", "3", "--lambda-update", "pid"]
    straight = tmp_path / "two"
    run("ppo_lag.py", ppo_args(checkpoints, straight, *extra), nproc=2)
    step_dir = straight / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "actor", "actor.optim", "cost_critic", "cost_critic.optim", "reward_critic", "reward_critic.optim", "rng",
        "state.json"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    rewind_to(resumed, 2, final="actor")
    result = run("ppo_lag.py", ppo_args(checkpoints, resumed, *extra))
    assert "resumed from" in result.stdout
    a, b = log_of(straight), log_of(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("reward", "cost", "lambda", "kl", "actor_loss", "reward_critic_loss", "cost_critic_loss",
                "mean_episode_cost", "constraint_violation"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5, abs=1e-6), key
    assert_same_weights(straight / "actor", resumed / "actor", rtol=1e-5)


def test_data_fingerprint_sees_every_id_label_and_boundary():
    """The hash a resume compares: equal data, equal hash; any id, label, order or boundary between fields
    or examples changed, another hash (so an edit cannot hide by moving a token across a boundary)."""
    from checkpoint import data_fingerprint
    from data.loaders import TokenizedCostPair, TokenizedSFT

    pairs = [TokenizedCostPair([1, 2], [3], 1, -1), TokenizedCostPair([4], [5, 6], -1, -1)]
    same = [TokenizedCostPair([1, 2], [3], 1, -1), TokenizedCostPair([4], [5, 6], -1, -1)]
    assert data_fingerprint(pairs) == data_fingerprint(same)
    others = [[TokenizedCostPair([1], [2, 3], 1, -1), pairs[1]],  # a token moved across the field boundary
              [TokenizedCostPair([1, 2], [3], -1, -1), pairs[1]],  # a safety label
              pairs[::-1],  # the order
              pairs[:1],  # an example dropped
              [TokenizedCostPair([1, 2], [3], 1, -1), TokenizedCostPair([4, 5], [6], -1, -1)]]
    assert len({data_fingerprint(pairs), *map(data_fingerprint, others)}) == 1 + len(others)
    # prompts (lists of ids) and dialogues: a boundary between examples counts too
    assert data_fingerprint([[1, 2], [3]]) != data_fingerprint([[1], [2, 3]])
    assert data_fingerprint([TokenizedSFT([1, 2, 3], 1)]) != data_fingerprint([TokenizedSFT([1, 2, 3], 2)])
