"""runner.py runs stage scripts in the caller's directory: pipeline.py and rounds.py resolve their
relative paths (the default --out is "out") there, so a stage run anywhere else would write its
product where they do not look (pipeline.py run outside the repository stopped after SFT with
"No such file or directory: out/sft/pipeline_flags.json")."""

import json
import os

import pytest

import runner

STAGE = """import sys
from pathlib import Path
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
(out / "product").write_text("made")
"""


@pytest.fixture
def scripts_and_cwd(tmp_path, monkeypatch):
    scripts, cwd = tmp_path / "repo", tmp_path / "elsewhere"
    scripts.mkdir()
    cwd.mkdir()
    (scripts / "stage.py").write_text(STAGE)
    monkeypatch.setattr(runner, "ROOT", scripts)
    monkeypatch.chdir(cwd)
    return scripts, cwd


def test_run_script_resolves_relative_paths_in_the_callers_directory(scripts_and_cwd):
    scripts, cwd = scripts_and_cwd
    runner.run_script("stage.py", ["out/sft"])
    assert (cwd / "out" / "sft" / "product").read_text() == "made"
    assert not (scripts / "out").exists()


def test_steps_resolve_relative_products_in_the_callers_directory(scripts_and_cwd):
    scripts, cwd = scripts_and_cwd
    steps = runner.Steps("timings.json")
    steps.run("one", "out/a/product", lambda: runner.run_script("stage.py", ["out/a"]),
              made_with=("out/a/flags.json", ["stage.py", "out/a"]))
    steps.run_together([("two", "out/b/product", "stage.py", ["out/b"]),
                        ("three", "out/c/product", "stage.py", ["out/c"])])
    for name in "abc":
        assert (cwd / "out" / name / "product").read_text() == "made"
    assert json.loads((cwd / "out" / "a" / "flags.json").read_text()) == ["stage.py", "out/a"]
    assert set(json.loads((cwd / "timings.json").read_text())) == {"one", "two", "three"}
    assert not (scripts / "out").exists()


def test_run_together_fails_when_any_job_fails(scripts_and_cwd):
    scripts, cwd = scripts_and_cwd
    (scripts / "broken.py").write_text("import sys\nsys.exit(3)\n")
    steps = runner.Steps("timings.json")
    with pytest.raises(SystemExit, match=r"two and three failed \(exit codes \[0, 3\]\)"):
        steps.run_together([("two", "out/b/product", "stage.py", ["out/b"]), ("three", "out/c/product", "broken.py", [])])
    assert (cwd / "out" / "b" / "product").read_text() == "made"
    assert "two" not in steps.timings and "three" not in steps.timings  # nothing recorded as done


def test_a_stage_killed_by_a_signal_is_a_failure(scripts_and_cwd):
    # Killed by the kernel (the OOM killer's SIGKILL): subprocess reports exit -9, which is no success;
    # the pipeline must stop there, not go on to the next stage without this one's product.
    scripts, cwd = scripts_and_cwd
    (scripts / "killed.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(SystemExit, match=r"killed.py failed \(exit -9\); fix it and re-run"):
        runner.run_script("killed.py", [])
    steps = runner.Steps()
    with pytest.raises(SystemExit, match=r"one failed \(exit codes \[-9\]\)"):
        steps.run_together([("one", "out/a/product", "killed.py", [])])


def test_a_step_runs_when_only_its_products_folder_exists(scripts_and_cwd):
    # An interrupted stage leaves its output folder (checkpoints, logs) without its product: it runs again
    # (and resumes), rather than being taken as done.
    scripts, cwd = scripts_and_cwd
    for name in "ab":
        (cwd / "out" / name / "checkpoints").mkdir(parents=True)
    steps = runner.Steps()
    steps.run("one", "out/a/product", lambda: runner.run_script("stage.py", ["out/a"]))
    steps.run_together([("two", "out/b/product", "stage.py", ["out/b"])])
    assert (cwd / "out" / "a" / "product").read_text() == (cwd / "out" / "b" / "product").read_text() == "made"
    assert set(steps.timings) == {"one", "two"}


def test_a_skipped_step_made_with_other_flags_is_pointed_out(scripts_and_cwd, capsys):
    scripts, cwd = scripts_and_cwd
    steps = runner.Steps()
    steps.run("one", "out/a/product", lambda: runner.run_script("stage.py", ["out/a"]),
              made_with=("out/a/flags.json", ["stage.py", "out/a", "--lr", "1"]))
    capsys.readouterr()
    steps.run("one", "out/a/product", lambda: pytest.fail("ran again"),
              made_with=("out/a/flags.json", ["stage.py", "out/a", "--lr", "1"]))
    same = capsys.readouterr().out
    assert "skipped" in same and "warning" not in same
    steps.run("one", "out/a/product", lambda: pytest.fail("ran again"),
              made_with=("out/a/flags.json", ["stage.py", "out/a", "--lr", "2"]))
    assert "warning: it was made with other flags (out/a/flags.json)" in capsys.readouterr().out
    assert json.loads((cwd / "out" / "a" / "flags.json").read_text()) == ["stage.py", "out/a", "--lr", "1"]


def test_a_product_older_than_its_inputs_or_made_with_other_flags_is_made_again(scripts_and_cwd, capsys):
    # An evaluation (inputs: the models it judges) is kept only while it is newer than each of them and
    # was made with the same flags; a step without inputs (a training stage) is never made again.
    scripts, cwd = scripts_and_cwd
    model = cwd / "out" / "model.json"
    model.parent.mkdir(parents=True)
    model.write_text("{}")
    made = []

    def evaluate(flags, inputs=(model,)):
        steps.run("eval", "out/e/product", lambda: made.append(runner.run_script("stage.py", ["out/e"])),
                  made_with=("out/e/flags.json", flags), inputs=inputs)

    steps = runner.Steps()
    evaluate(["a"])
    product = cwd / "out" / "e" / "product"
    os.utime(model, ns=(product.stat().st_mtime_ns - 10**9,) * 2)  # the model a second older than the product
    evaluate(["a"])
    assert len(made) == 1 and "exists, skipped" in capsys.readouterr().out
    os.utime(model, ns=(product.stat().st_mtime_ns + 1,) * 2)  # the model made again, after the evaluation
    evaluate(["a"])
    assert len(made) == 2
    assert f"out/e/product is out of date: {model} is newer; made again" in capsys.readouterr().out
    evaluate(["b"])
    assert len(made) == 3 and "it was made with other flags (out/e/flags.json); made again" in capsys.readouterr().out
    assert json.loads((cwd / "out" / "e" / "flags.json").read_text()) == ["b"]
    os.utime(model, ns=(product.stat().st_mtime_ns + 1,) * 2)
    evaluate(["c"], inputs=())  # no inputs: kept, other flags only pointed out
    assert len(made) == 3 and "warning: it was made with other flags" in capsys.readouterr().out
