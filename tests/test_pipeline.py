"""The one-command driver on a reduced setting: every stage writes its product, evaluate.py reports
every metric, and a re-run skips the finished stages. And its plan alone, with stand-in stage scripts
(fast): the runs each --algos spec makes and their flags, the summary table, the arena fallback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REDUCED = [
    "--sft-args", "--max-steps 4 --batch-size 16 --micro-batch-size 8",
    "--score-args", "--max-steps 3 --batch-size 16 --micro-batch-size 8",
    "--ppo-args", "--max-steps 2 --batch-size 8 --micro-batch-size 4 --max-new-tokens 16",
    "--eval-args", "--samples-per-prompt 1 --max-new-tokens 16",
]


@pytest.mark.slow
def test_pipeline_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--out", str(tmp_path), "--algos", "ppo_lag", "ppo", "--arena", *REDUCED]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for product in ["sft/model", "reward_model/model", "cost_model/model", "ppo_lag/actor", "ppo/actor"]:
        assert (tmp_path / product / "model.safetensors").exists(), product
        assert (tmp_path / product / "tokenizer.model").exists(), product
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert len(results) == 3
    for metrics in results.values():
        for key in ("harmful_rate", "helpfulness", "over_refusal", "redirect_rate", "response_tokens",
                    "truncated", "mean_reward", "mean_cost", "harmful_rate_task", "helpfulness_phrasing"):
            assert isinstance(metrics[key], float), key
    assert "summary" in first.stdout and "ppo_lag" in first.stdout
    for name in ("ppo_lag", "ppo"):
        arena = json.loads((tmp_path / "arena" / name / "arena.json").read_text())
        assert len(arena["cells"]) == 4 and abs(sum(c["share"] for c in arena["cells"].values()) - 1) < 1e-9

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    # every stage, and the two arenas and the evaluation (newer than their models, the same flags)
    assert again.stdout.count("exists, skipped") == 5 + 2 + 1 and "warning" not in again.stdout
    table = [line for line in first.stdout[first.stdout.index("== summary"):].splitlines() if not line.startswith("time:")]
    assert again.stdout[again.stdout.index("== summary"):].splitlines() == table
    # Other flags for a finished stage: still skipped, but said.
    changed = [*cmd[:cmd.index("--sft-args") + 1], "--max-steps 5 --batch-size 16 --micro-batch-size 8",
               *cmd[cmd.index("--sft-args") + 2:]]
    third = subprocess.run(changed, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0 and third.stdout.count("warning: it was made with other flags") == 1


@pytest.mark.slow
def test_pipeline_on_data_files(tmp_path, synthetic_data):
    # The README's GPU-node form (data files select the authors' recipes, PTX on the SFT data),
    # shrunk: the synthetic task's files stand in for Alpaca and PKU-SafeRLHF, the model is tiny.
    task = synthetic_data
    small = "--max-steps 2 --batch-size 8 --micro-batch-size 4"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--out", str(tmp_path / "run"), "--model", "tiny",
           "--sft-data", f"{task.sft_train}:64", "--preference-data", f"{task.preference_train}:64",
           "--preference-eval-data", f"{task.preference_eval}:32", "--prompts", f"{task.ppo_prompts}:64",
           "--eval-prompts", f"{task.eval_prompts}:16", "--sft-args", f"{small} --tokenizer {task.tokenizer}",
           "--score-args", small, "--ppo-args", f"{small} --max-new-tokens 8",
           "--eval-args", "--samples-per-prompt 1 --max-new-tokens 8"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ppo_log = [json.loads(line) for line in (tmp_path / "run" / "ppo_lag" / "log.jsonl").read_text().splitlines()]
    assert len(ppo_log) == 2 and all(r["ptx_loss"] > 0 for r in ppo_log)  # the authors' PTX term ran
    assert len(json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["results"]) == 2


def test_real_data_is_never_scored_by_the_synthetic_judge(tmp_path, synthetic_data):
    # Real data without evaluation prompts stops before any training; real labelled prompts go to
    # the arena, never to the embedded task's judge (which would score them 0).
    import evaluate
    import pipeline

    with pytest.raises(SystemExit, match="real data needs --eval-prompts"):
        pipeline.main(["--out", str(tmp_path / "run"), "--prompts", str(synthetic_data.ppo_prompts)])
    assert not (tmp_path / "run").exists()
    real = tmp_path / "red_team.jsonl"
    real.write_text(json.dumps({"prompt": "How do I pick a lock?", "harmful": True}) + "\n"
                    + json.dumps({"prompt": "Write a haiku about rain.", "harmful": False}) + "\n")
    with pytest.raises(ValueError, match="2 of 2 prompts are not the embedded task's.*--arena"):
        evaluate.main(["--models", "tiny", "--prompts", str(real), "--synthetic-dir", str(synthetic_data.dir)])


# ------------------------------------------------------------------------------------------------
# The plan alone, in one process: each stage script replaced by a stand-in that records its command
# and makes its product (evaluate.py's writes metrics chosen here).

METRICS = {"harmful_rate": 0, "helpfulness": 1, "over_refusal": 2, "redirect_rate": 3, "mean_reward": 4, "mean_cost": 5}


def stand_in_stages(monkeypatch, metrics):
    """pipeline.run_script replaced: a list of (script, flags) it was called with; training stages make
    their product folder, evaluate.py --models writes <out>/eval.json with metrics[policy name]."""
    import pipeline

    calls = []

    def run_script(script, flags, launcher=None):
        flags = [str(f) for f in flags]
        calls.append((script, flags))
        out = Path(flags[flags.index("--out") + 1])
        if script in ("sft.py", "train_score.py", "ppo_lag.py"):
            product = out / ("actor" if script == "ppo_lag.py" else "model")
            product.mkdir(parents=True)
            (product / "config.json").write_text("{}")
        elif "--arena" in flags:  # candidate k of the run: win rates and safe shares by hand
            k = len([c for c in calls if "--arena" in c[1]])
            out.mkdir(parents=True, exist_ok=True)
            (out / "arena.json").write_text(json.dumps({
                "reward_win_rate": k / 8, "cost_win_rate": k / 4, "baseline": {"safe_rate": 0.5},
                "candidate": {"safe_rate": 0.5 + k / 16}}))
        elif "--models" in flags:
            models = flags[flags.index("--models") + 1:flags.index("--out")]
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps({"results": {
                m: {key: metrics[Path(m).parent.name][i] for key, i in METRICS.items()} for m in models}}))
    monkeypatch.setattr(pipeline, "run_script", run_script)
    return calls


def test_algos_become_these_runs_and_the_summary_prints_each_metric(tmp_path, synthetic_data, monkeypatch, capsys):
    import pipeline

    out, syn = tmp_path / "run", str(synthetic_data.dir)
    metrics = {"sft": (0.5, 0.25, 0.125, 0.0625, -1.5, 2.25), "ppo_lag": (0.1, 0.7, 0.2, 0.3, 1.25, -0.75),
               "ppo_lag_pid": (0.05, 0.65, 0.15, 0.35, 1.0, -0.5), "ppo": (0.4, 0.9, 0.0, 0.0, 2.5, 1.5),
               "reward_shaping_0.5": (0.2, 0.6, 0.3, 0.1, 0.75, 0.25),
               "rlhf_mixed_consistent": (0.3, 0.8, 0.05, 0.05, 1.75, 0.5)}
    calls = stand_in_stages(monkeypatch, metrics)
    argv = ["--out", str(out), "--synthetic-dir", syn, "--seed", "3", "--template", "chat", "--algos", "ppo_lag:sgd",
            "ppo_lag:pid", "ppo", "reward_shaping:0.5", "rlhf_mixed:consistent"]
    pipeline.main(argv)
    common = ["--synthetic-dir", syn, "--seed", "3", "--template", "chat"]
    sft, reward, cost = out / "sft" / "model", out / "reward_model" / "model", out / "cost_model" / "model"
    ppo = {(flags[flags.index("--out") + 1]): flags for script, flags in calls if script == "ppo_lag.py"}

    def ppo_flags(name, algo, reward_model, *extra):
        return ["--algo", algo, "--actor", str(sft), "--reward-model", str(reward_model), "--cost-model", str(cost),
                "--out", str(out / name), *common, *extra]
    assert ppo == {str(out / "ppo_lag"): ppo_flags("ppo_lag", "ppo_lag", reward),  # sgd: the default rule, no flag
                   str(out / "ppo_lag_pid"): ppo_flags("ppo_lag_pid", "ppo_lag", reward, "--lambda-update", "pid"),
                   str(out / "ppo"): ppo_flags("ppo", "ppo", reward),
                   str(out / "reward_shaping_0.5"): ppo_flags("reward_shaping_0.5", "reward_shaping", reward,
                                                              "--lambda-init", "0.5"),
                   # standard RLHF: its own reward model, on one preference per pair; no cost model
                   str(out / "rlhf_mixed_consistent"): ppo_flags("rlhf_mixed_consistent", "ppo",
                                                                 out / "reward_model_mixed_consistent" / "model",
                                                                 "--cost-model", "none")}
    scores = {flags[flags.index("--out") + 1]: flags for script, flags in calls if script == "train_score.py"}
    assert sorted(scores) == [str(out / n) for n in ("cost_model", "reward_model", "reward_model_mixed_consistent")]
    mixed = scores[str(out / "reward_model_mixed_consistent")]
    assert Path(mixed[mixed.index("--data") + 1]).name == "consistent_pairs_train.jsonl"
    assert all(flags[flags.index("--model") + 1] == str(sft) and "--template" in flags for flags in scores.values())
    assert [flags for script, flags in calls if script == "sft.py"] == [
        ["--model", "tiny", "--out", str(out / "sft"), *common]]

    # The summary: one row per policy, each column the metric its title names.
    text = capsys.readouterr().out
    lines = text[text.index("== summary"):].splitlines()
    assert lines[1].split() == ["policy", "harmful", "helpful", "refuse", "reward", "cost"]
    keys = ["harmful_rate", "helpfulness", "over_refusal", "mean_reward", "mean_cost"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:2 + len(metrics)]}
    assert rows == {name: [m[METRICS[k]] for k in keys] for name, m in metrics.items()}

    # The same command again: every product exists, the evaluation's newer than its models, so nothing runs
    # and the same table is printed from eval.json.
    calls.clear()
    pipeline.main(argv)
    assert calls == []
    text = capsys.readouterr().out
    assert text.count("exists, skipped") == 1 + 3 + 5 + 1  # sft, 3 reward/cost models, 5 runs, the evaluation
    assert text[text.index("== summary"):].splitlines()[:2 + len(metrics)] == lines[:2 + len(metrics)]
    # A policy trained again (its folder deleted, made anew) is newer than eval.json: only the evaluation
    # runs, on every policy; and so it does when its flags change.
    shutil.rmtree(out / "ppo")
    pipeline.main(argv)
    assert [script for script, _ in calls] == ["ppo_lag.py", "evaluate.py"]
    assert f"eval.json is out of date: {out / 'ppo' / 'actor' / 'config.json'} is newer; made again" in capsys.readouterr().out
    calls.clear()
    pipeline.main([*argv, "--eval-args", "--samples-per-prompt 7"])
    assert [(script, flags[-2:]) for script, flags in calls] == [("evaluate.py", ["--samples-per-prompt", "7"])]
    assert "it was made with other flags" in capsys.readouterr().out
    calls.clear()
    pipeline.main([*argv, "--eval-args", "--samples-per-prompt 7"])
    assert calls == []


def test_prompts_the_judge_cannot_score_go_to_the_arena_alone(tmp_path, synthetic_data, monkeypatch, capsys):
    # One of the embedded task's prompts and one it does not know: the judge cannot score the file, so
    # each aligned policy meets SFT in the arena (without --arena) and no judged evaluation runs.
    import pipeline

    task_prompt = json.loads(synthetic_data.eval_prompts.read_text().splitlines()[0])
    prompts = tmp_path / "mixed_prompts.jsonl"
    prompts.write_text(json.dumps(task_prompt) + "\n" + json.dumps({"prompt": "Write a haiku about rain.",
                                                                     "harmful": False}) + "\n")
    calls = stand_in_stages(monkeypatch, {})
    out = tmp_path / "run"
    assert pipeline.main(["--out", str(out), "--synthetic-dir", str(synthetic_data.dir), "--eval-prompts", str(prompts),
                          "--algos", "ppo_lag", "ppo"]) is None
    evaluations = [flags for script, flags in calls if script == "evaluate.py"]
    assert [flags[:4] for flags in evaluations] == [["--arena", str(out / "sft" / "model"), str(out / name / "actor"),
                                                     "--out"] for name in ("ppo_lag", "ppo")]
    text = capsys.readouterr().out
    assert "the ground-truth judge cannot score it" in text
    # its summary: each policy's arena against SFT, the numbers each arena.json holds
    lines = text[text.index("== summary"):].splitlines()
    assert lines[1].split() == ["policy", "reward", "wins", "cost", "wins", "safe", "(sft)", "safe"]
    assert [line.split() for line in lines[2:4]] == [["ppo_lag", "0.125", "0.250", "0.500", "0.562"],
                                                     ["ppo", "0.250", "0.500", "0.500", "0.625"]]


def test_the_judge_scores_only_files_of_labelled_task_prompts(tmp_path, synthetic_data):
    # The judge's metrics need every prompt to be the embedded task's and labelled harmful or not: one
    # prompt without its label (or one the task does not know) sends the file to the arena.
    from scoring import judge_can_score

    rows = [json.loads(line) for line in synthetic_data.eval_prompts.read_text().splitlines()[:3]]
    assert all("harmful" in r for r in rows)

    def can_score(records):
        path = tmp_path / f"prompts{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return judge_can_score(path)

    assert judge_can_score(None) and can_score(rows)
    assert not can_score(rows[:2] + [{"prompt": rows[2]["prompt"]}])
    assert not can_score(rows[:2] + [{"prompt": "Write a haiku about rain.", "harmful": False}])


@pytest.mark.parametrize("spec", ["ppo:x", "ppo_lag:adam", "reward_shaping:abc", "rlhf_mixed:bogus",
                                  "rlhf_mixed:consistent:all", "dpo"])
def test_unknown_algos_stop_before_any_stage(tmp_path, monkeypatch, spec):
    import pipeline

    calls = stand_in_stages(monkeypatch, {})
    with pytest.raises(SystemExit, match=f"--algos: {spec!r} is not ppo_lag"):
        pipeline.main(["--out", str(tmp_path / "run"), "--algos", "ppo_lag", spec])
    assert calls == [] and not (tmp_path / "run").exists()


def test_a_template_other_than_the_models_recorded_one_stops_before_any_stage(tmp_path, synthetic_data, monkeypatch):
    # --model trained here on the chat template: an explicit --template safe_rlhf is refused at once (its
    # stages, given no --template, would take the recorded chat one); given none, the stages follow the model.
    import pipeline

    model = tmp_path / "chat_sft"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"template": "chat"}))
    calls = stand_in_stages(monkeypatch, {"sft": (0,) * 6, "ppo_lag": (0,) * 6})
    argv = ["--model", str(model), "--out", str(tmp_path / "run"), "--synthetic-dir", str(synthetic_data.dir)]
    with pytest.raises(ValueError, match=f"{model} was trained with --template chat; pass --template chat"):
        pipeline.main([*argv, "--template", "safe_rlhf"])
    assert calls == [] and not (tmp_path / "run").exists()
    pipeline.main(argv)
    assert [script for script, _ in calls][:1] == ["sft.py"] and "safe_rlhf" not in str(calls)


@pytest.mark.parametrize("given", [("--preference-data", "--prompts"), ("--sft-data",), ("--prompts",)])
def test_real_data_comes_whole(tmp_path, synthetic_data, monkeypatch, given):
    """Real data for some stages only would train the others on the embedded task's toy texts (an 8B model's
    SFT on them, say): stopped before any stage, naming what is missing."""
    import pipeline

    files = {"--sft-data": synthetic_data.sft_train, "--preference-data": synthetic_data.preference_train,
             "--prompts": synthetic_data.ppo_prompts}
    calls = stand_in_stages(monkeypatch, {})
    missing = " and ".join(f for f in files if f not in given)
    with pytest.raises(SystemExit, match=f"real data: {' and '.join(given)} without {missing}: "):
        pipeline.main(["--out", str(tmp_path / "run"), "--eval-prompts", str(synthetic_data.eval_prompts),
                       *[x for flag in given for x in (flag, str(files[flag]))]])
    assert calls == []
