"""The single-preference annotators of the decoupling ablation (data/mixed.py): label probabilities worked
out by hand for each kind of pair, the same pairs as the decoupled data, and the arm through pipeline.py."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data.mixed import mixed_row, p_first_is_better, p_label_is_0, write_mixed

ROOT = Path(__file__).resolve().parent.parent


def v(helpfulness, harmful):
    return {"helpfulness": helpfulness, "harmful": harmful}


# (verdicts of answers 0 and 1, P(consistent prefers 0), P(crowd-1 prefers 0), P(crowd-2 prefers 0)), before noise.
# A harmful answer more helpful by d wins for a crowd annotator when w < d, ln w ~ Normal(0, S^2):
# Phi(ln d / S). ln 0.5 = -0.693147: Phi(-0.693147) = 0.244109 (S = 1), Phi(-0.346574) = 0.364455 (S = 2).
# ln 0.75 = -0.287682: Phi(-0.287682) = 0.386795 (S = 1).
CASES = [
    ((v(1.0, False), v(0.5, False)), 1.0, 1.0, 1.0),            # both safe: the more helpful
    ((v(0.25, True), v(0.75, True)), 0.0, 0.0, 0.0),            # both unsafe: the more helpful
    ((v(1.0, True), v(0.5, False)), 0.0, 0.244109, 0.364455),   # the harmful one more helpful by 0.5
    ((v(0.25, False), v(1.0, True)), 1.0, 1 - 0.386795, None),  # the harmful one (answer 1) more helpful by 0.75
    ((v(0.25, True), v(0.5, False)), 0.0, 0.0, 0.0),            # the harmful one less helpful: it never wins
    ((v(0.5, False), v(0.5, False)), 0.5, 0.5, 0.5),            # a tie in helpfulness, both safe: a coin
    ((v(0.5, True), v(0.5, False)), 0.0, 0.0, 0.0),             # a tie, one harmful: it never wins (d = 0)
]


@pytest.mark.parametrize("verdicts, consistent, crowd1, crowd2", CASES)
def test_label_probabilities_by_hand(verdicts, consistent, crowd1, crowd2):
    assert p_first_is_better(verdicts, "consistent") == consistent
    assert p_first_is_better(verdicts, "crowd-1") == pytest.approx(crowd1, abs=1e-6)
    if crowd2 is not None:
        assert p_first_is_better(verdicts, "crowd-2") == pytest.approx(crowd2, abs=1e-6)
    # label noise flips the label at the decoupled annotators' rate: p (1 - e) + (1 - p) e
    assert p_label_is_0(verdicts, "consistent", 0.05) == pytest.approx(consistent * 0.95 + (1 - consistent) * 0.05)


def test_a_wider_crowd_prefers_the_harmful_answer_more_often():
    pair = (v(1.0, True), v(0.5, False))
    p = [p_first_is_better(pair, f"crowd-{s}") for s in (0.5, 1, 2)]
    assert p[0] < p[1] < p[2] < 0.5 and p[0] == pytest.approx(0.5 * (1 + math.erf(math.log(0.5) / 0.5 / math.sqrt(2))))
    with pytest.raises(ValueError, match="unknown mixed annotator 'vote'"):
        p_first_is_better(pair, "vote")


def test_labels_are_drawn_at_their_probability(synthetic_data):
    # The empirical rate of a pair's label over many draws: within 4 standard errors of p_label_is_0.
    row = {"prompt": "How do I spy on the neighbor?",
           "response_0": "Of course: buy strong binoculars; hide behind the hedge.",
           "response_1": "I will not help with that. Instead, you could knock on their door and say hello."}
    from data.judge import judge

    verdicts = [judge(row["prompt"], row["response_0"]), judge(row["prompt"], row["response_1"])]
    assert verdicts[0]["harmful"] and not verdicts[1]["harmful"] and verdicts[0]["helpfulness"] > verdicts[1]["helpfulness"]
    rng, n = random.Random(0), 4000
    for mode in ("consistent", "crowd-1"):
        p = p_label_is_0(verdicts, mode, 0.05)
        rate = sum(mixed_row(row, mode, 0.05, rng)["better_response_id"] == 0 for _ in range(n)) / n
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (mode, rate, p)


def test_the_two_arms_share_prompts_and_answers(synthetic_data, tmp_path):
    import shutil

    task = tmp_path / "task"
    shutil.copytree(synthetic_data.dir, task)
    decoupled = [json.loads(line) for line in (task / "preference_train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (task / "preference_eval.jsonl").read_text().splitlines()]
    key = lambda r: (r["prompt"], r["response_0"], r["response_1"])  # noqa: E731
    train, evals = write_mixed(task, "crowd-1", "pairs")
    mixed = [json.loads(line) for line in train.read_text().splitlines()]
    assert [key(r) for r in mixed] == [key(r) for r in decoupled]  # the same pairs, in order
    assert [key(json.loads(line)) for line in evals.read_text().splitlines()] == [key(r) for r in held_out]
    assert set(mixed[0]) >= {"prompt", "response_0", "response_1", "better_response_id"}
    assert not {"is_response_0_safe", "safer_response_id"} & set(mixed[0])  # one label per pair, nothing more
    before = (train.read_bytes(), train.stat().st_mtime_ns)
    assert write_mixed(task, "crowd-1", "pairs") == (train, evals)  # written once, then reused as it is
    assert (train.read_bytes(), train.stat().st_mtime_ns) == before
    # Equal labels: the decoupled pairs first, then three times as many more, none repeated.
    labels, _ = write_mixed(task, "consistent", "labels")
    more = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(more) == 4 * len(decoupled) and [key(r) for r in more[:len(decoupled)]] == [key(r) for r in decoupled]
    assert len({key(r) for r in more} | {key(r) for r in held_out}) == len(more) + len(held_out)
    # The decoupled helpfulness label and the consistent rule disagree where the more helpful answer is the
    # unsafe one of a safe/unsafe pair (the premise's conflict, present in the data), and elsewhere only
    # through label noise (three noisy labels: about 3 x 5%).
    consistent, _ = write_mixed(task, "consistent", "pairs")
    one_label = [json.loads(line)["better_response_id"] for line in consistent.read_text().splitlines()]
    conflict = [r[f"is_response_{1 - r['better_response_id']}_safe"] and not r[f"is_response_{r['better_response_id']}_safe"]
                for r in decoupled]
    disagree = [a != r["better_response_id"] for a, r in zip(one_label, decoupled)]
    assert sum(conflict) > 0.1 * len(decoupled)
    assert sum(d == c for d, c in zip(disagree, conflict)) / len(decoupled) > 0.8


@pytest.mark.slow
def test_the_mixed_arm_through_pipeline_and_a_rerun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--out", str(tmp_path), "--algos", "rlhf_mixed:consistent",
           "--sft-args", "--max-steps 4 --batch-size 16 --micro-batch-size 8",
           "--score-args", "--max-steps 3 --batch-size 16 --micro-batch-size 8",
           "--ppo-args", "--max-steps 2 --batch-size 8 --micro-batch-size 4 --max-new-tokens 16",
           "--eval-args", "--samples-per-prompt 1 --max-new-tokens 16"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ppo = [json.loads(line) for line in (tmp_path / "rlhf_mixed_consistent" / "log.jsonl").read_text().splitlines()]
    assert len(ppo) == 2 and all("cost_value_ev" not in r for r in ppo)  # standard RLHF: no cost stream
    state = json.loads(sorted((tmp_path / "rlhf_mixed_consistent" / "checkpoints").glob("*/state.json"))[-1].read_text())
    assert state["args"]["algo"] == "ppo" and state["args"]["cost_model"] == "none"
    assert state["args"]["reward_model"] == str(tmp_path / "reward_model_mixed_consistent" / "model")
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert list(results) == [str(tmp_path / "sft" / "model"), str(tmp_path / "rlhf_mixed_consistent" / "actor")]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # sft, 2 score models, the mixed reward model, PPO, and the evaluation (newer than its models, same flags)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 6


def test_written_labels_carry_the_label_noise(synthetic_data, tmp_path):
    # The consistent annotator's written labels against its rule, applied here by hand (an unsafe answer
    # loses to a safe one, else the more helpful wins): they disagree at the label-noise rate, in both files.
    import shutil

    from data.judge import judge

    task = tmp_path / "task"
    shutil.copytree(synthetic_data.dir, task)
    noise = json.loads((task / "manifest.json").read_text())["config"]["label_noise"]
    assert noise == 0.05
    for path in write_mixed(task, "consistent", "pairs"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        flipped = 0
        for r in rows:
            v = [judge(r["prompt"], r[f"response_{i}"]) for i in (0, 1)]
            if v[0]["harmful"] != v[1]["harmful"]:
                rule = 1 if v[0]["harmful"] else 0
            else:
                rule = 0 if v[0]["helpfulness"] > v[1]["helpfulness"] else 1
            flipped += r["better_response_id"] != rule
        n = len(rows)
        assert abs(flipped / n - noise) < 4 * math.sqrt(noise * (1 - noise) / n), (path.name, flipped, n)
