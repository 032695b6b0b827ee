"""--report-to tensorboard / wandb: the trackers hold log.jsonl's values, step for step, also after a run is
killed with SIGKILL and resumed (no step twice, none missing). Read back with TensorBoard's own event
reader and, for wandb in offline mode (WANDB_MODE=offline), from the run files wandb writes."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_stages import ROOT, log_of, run  # noqa: E402

ARGS = ["--max-steps", "8", "--batch-size", "16", "--micro-batch-size", "8", "--eval-every", "4", "--save-every", "2",
        "--max-length", "96"]


def killed_and_resumed(out: Path, synthetic_dir, tracker: str, env_extra: dict):
    """sft.py killed with SIGKILL after its 5th logged step, then the same command again to the end."""
    args = [*ARGS, "--synthetic-dir", str(synthetic_dir), "--report-to", tracker, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch", **env_extra}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sft.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, log = time.time() + 300, out / "log.jsonl"
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    run("sft.py", args, env_extra=env_extra)
    lines = log_of(out)
    assert [r["step"] for r in lines] == list(range(1, 9))
    return lines


@pytest.mark.slow
def test_tensorboard_holds_the_log_across_a_kill(tmp_path, synthetic_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = killed_and_resumed(tmp_path / "run", synthetic_data.dir, "tensorboard", {})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()  # the reader drops what the killed run logged past the resumed step (purge_step)
    for key in ("loss", "lr", "grad_norm", "eval_loss"):
        scalars = events.Scalars(key)
        expected = [(r["step"], r[key]) for r in lines if key in r]
        assert [s.step for s in scalars] == [step for step, _ in expected], key
        assert [s.value for s in scalars] == pytest.approx([v for _, v in expected], rel=1e-6), key  # float32
    flags = json.loads(events.Tensors("flags/text_summary")[0].tensor_proto.string_val[0].decode())  # the run's flags
    assert flags["max_steps"] == 8 and flags["report_to"] == ["tensorboard"]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a .wandb run file: LevelDB-log framing (32 KiB blocks of chunks: crc32, length,
    type) after wandb's 7-byte header, each record one protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    rows, pos, pending = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2, 3):  # FULL, FIRST, MIDDLE
            pending = chunk if kind in (1, 2) else pending + chunk
        if kind == 4:  # LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_holds_the_log_across_a_kill(tmp_path, synthetic_data):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "safe-rlhf-test"}
    lines = killed_and_resumed(tmp_path / "run", synthetic_data.dir, "wandb", env)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = json.loads((tmp_path / "run" / "wandb_run.json").read_text())["id"]
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the same run, resumed
    # The killed process's file may hold less than it sent (wandb buffers); the resumed one resent the
    # earlier steps from log.jsonl, so it holds the whole history, each step once.
    history = wandb_history(runs[-1] / f"run-{run_id}.wandb")
    assert [row["_step"] for row in history] == list(range(1, 9))
    for row, line in zip(history, lines):
        for key in ("loss", "lr", "grad_norm", "eval_loss"):
            assert row.get(key) == line.get(key), (line["step"], key)


def test_a_tracker_that_is_not_installed_is_one_line_before_any_work(monkeypatch, tmp_path, synthetic_data):
    import importlib.machinery
    import importlib.util

    import cli
    import sft

    real = importlib.util.find_spec
    fake = {"wandb": None, "tensorboard": importlib.machinery.ModuleSpec("tensorboard", None)}  # whatever is installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake[name] if name in fake else real(name, *a))
    with pytest.raises(ImportError, match=r"^--report-to wandb needs the wandb package: pip install wandb$"):
        sft.main(["--synthetic-dir", str(synthetic_data.dir), "--report-to", "tensorboard", "wandb",
                  "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    cli.check_report_to(["none"])  # nothing asked, nothing needed


def test_logger_on_resume_drops_the_steps_being_redone(tmp_path):
    """A resume at step 2 keeps log.jsonl's lines of steps 1 and 2 only: the killed run's steps 3 and 4 and
    its last line, cut short by the kill, go, so each step is in the log once, in order."""
    import torch

    import training

    d = training.Dist(0, 1, 0, torch.device("cpu"), None)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    logger = training.Logger(tmp_path, d, total_steps=6, name="t", resume_step=2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    logger.log(3, {"loss": 0.5})
    logger.close()
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 0.5}]
    training.Logger(tmp_path, d, total_steps=6, name="t", resume_step=0).close()  # a fresh start: nothing kept
    assert log.read_text() == ""


class FakeWandbRun:
    def __init__(self, step):
        self.step, self.sent = step, []

    def log(self, values, step):
        self.sent.append((step, values))

    def finish(self):
        pass


def test_wandb_resends_from_its_step_only_plottable_numbers(monkeypatch, tmp_path):
    """A resumed online run: wandb says it is at step 3 (its next step), so steps 3 and 4 of log.jsonl are
    resent and 1, 2 are not; only finite numbers go (no 'step' key, no bool, string or NaN)."""
    import types

    import trackers

    run = FakeWandbRun(step=3)
    inits = []
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    backlog = [{"step": s, "loss": float(s), "lr": 0.5, "done": False, "name": "x", "kl": float("nan")}
               for s in (1, 2, 3, 4)]
    opened = trackers.open_trackers(["wandb", "none"], tmp_path, "sft", {"lr": 0.5}, resume_step=4, backlog=backlog)
    opened.log(5, {"step": 5, "loss": 0.25, "grad_norm": float("inf")})
    opened.close()
    assert run.sent == [(3, {"loss": 3.0, "lr": 0.5}), (4, {"loss": 4.0, "lr": 0.5}), (5, {"loss": 0.25})]
    assert inits[0]["resume"] == "allow" and inits[0]["id"] == json.loads((tmp_path / "wandb_run.json").read_text())["id"]


def test_tensorboard_scalars_leave_out_step_and_non_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trackers

    opened = trackers.open_trackers(["tensorboard"], tmp_path, "sft", {"lr": 0.5}, resume_step=0)
    opened.log(1, {"step": 1, "loss": 2.0, "done": True, "name": "x", "kl": float("nan"), "lr": 0.5})
    opened.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 2.0)]


def test_wandb_resumes_the_run_its_folder_names(monkeypatch, tmp_path):
    # The id kept in <out>/wandb_run.json is the run resumed (a new id would start a second wandb run for
    # one training run), and wandb asked for twice is opened once.
    import types

    import trackers

    run, inits = FakeWandbRun(step=0), []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: inits.append(kw) or run))
    (tmp_path / "wandb_run.json").write_text(json.dumps({"id": "0123456789ab"}) + "\n")
    trackers.open_trackers(["wandb", "wandb"], tmp_path, "sft", {}, resume_step=2).close()
    assert [kw["id"] for kw in inits] == ["0123456789ab"]
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": "0123456789ab"}


def test_tensorboard_resume_keeps_each_step_once(tmp_path):
    """A run logged steps 1-4 and was killed after its checkpoint at step 2; resumed, it logs step 3
    again. The reader holds steps 1 and 2 of the first run and the resumed run's 3 (purge_step 3: the killed
    run's 3 and 4 go, its 2 stays); the resumed run's own file holds step 3 alone (nothing resent) and the
    flags are written once. A run resumed with tensorboard newly asked for (no folder yet) gets its earlier
    steps from log.jsonl's lines (backlog), each at its own step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    import trackers

    def scalars(directory):
        events = EventAccumulator(str(directory / "tensorboard"))
        events.Reload()
        return [(s.step, s.value) for s in events.Scalars("loss")], events

    first = trackers.open_trackers(["tensorboard"], tmp_path / "a", "sft", {"lr": 0.5}, resume_step=0)
    for step in (1, 2, 3, 4):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = trackers.open_trackers(["tensorboard"], tmp_path / "a", "sft", {"lr": 0.5}, resume_step=2,
                                     backlog=[{"step": s, "loss": float(s)} for s in (1, 2)])
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    held, events = scalars(tmp_path / "a")
    assert held == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert len(events.Tensors("flags/text_summary")) == 1
    files = sorted((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    per_file = [[e.step for e in EventFileLoader(str(f)).Load() if any(v.tag == "loss" for v in e.summary.value)]
                for f in files]
    assert sorted(per_file, key=len) == [[3], [1, 2, 3, 4]]
    flags = [[e for e in EventFileLoader(str(f)).Load() if any(v.tag.startswith("flags") for v in e.summary.value)]
             for f in files]
    assert sorted(map(len, flags)) == [0, 1]

    late = trackers.open_trackers(["tensorboard"], tmp_path / "b", "sft", {"lr": 0.5}, resume_step=2,
                                  backlog=[{"step": s, "loss": float(s)} for s in (1, 2)])
    late.log(3, {"loss": 30.0})
    late.close()
    assert scalars(tmp_path / "b")[0] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_closing_closes_every_tracker():
    # With both trackers, closing must finish the wandb run and flush tensorboard's file, not the first alone.
    import trackers

    closed = []

    class Tracker:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    trackers.Trackers([Tracker("tensorboard"), Tracker("wandb")]).close()
    assert closed == ["tensorboard", "wandb"]
