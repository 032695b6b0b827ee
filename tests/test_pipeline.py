"""The one-command driver on a reduced setting: every stage writes its product, evaluate.py reports
every metric, and a re-run skips the finished stages."""

import json
import os
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
    assert again.stdout.count("skipped") == 5 and "warning" not in again.stdout
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
