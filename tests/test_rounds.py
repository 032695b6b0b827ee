"""rounds.py, iterated Safe RLHF: the collect step never draws a held-out prompt, phrasing or task; the
exported annotation file round-trips through the loaders; labelled files with missing or inconsistent
labels are refused naming the line; a round whose later products are lost (or that is killed) resumes
and finishes, skipping the finished steps.

Round 1 here is a stand-in pipeline output: untrained 1-layer models (a few seconds to write), so the
rounds' own machinery is what takes the time; the stage scripts run with two optimiser steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hf_io
import rounds
from data.judge import identify_task
from data.loaders import DataError, load_eval_prompts, load_preferences
from data.synthetic import (HELD_OUT_PHRASINGS, PHRASINGS, ROUND_PHRASINGS, annotate_pair, phrasing_of,
                            round_prompt_rows, training_prompt_pool)
from data.world import TASKS
from fileio import read_jsonl, write_jsonl
from iterated import threshold
from iterated.label import LABEL_FIELDS, check_labelled

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}


def fake_round_one(directory: Path, task) -> Path:
    """What pipeline.py leaves behind (sft, reward and cost models, the PPO-Lagrangian actor), with
    untrained 1-layer models."""
    from data.tokenizer import Tokenizer
    from model import ModelArgs, Transformer

    tok = Tokenizer(task.tokenizer)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=64,
                     max_seq_len=256)
    save = dict(extra_files=tok.files, extra_config={"template": "safe_rlhf"})
    lm = Transformer(args)
    lm.init_weights(seed=0)
    hf_io.save_pretrained(lm, directory / "sft" / "model", **save)
    hf_io.save_pretrained(lm, directory / "ppo_lag" / "actor", **save)
    for seed, objective in enumerate(("reward", "cost"), start=1):
        scorer = Transformer(args, head="score")
        scorer.init_weights(seed=seed)
        scorer.score_stats = {"objective": objective, "mean": 0.0, "std": 1.0, "q05": -1.6, "q25": -0.7, "q50": 0.0,
                              "q75": 0.7, "q95": 1.6}
        hf_io.save_pretrained(scorer, directory / f"{objective}_model" / "model", **save)
    # the end of its PPO log: the multiplier round 2 starts from (--carry-lambda)
    (directory / "ppo_lag" / "log.jsonl").write_text("".join(
        json.dumps({"step": step, "lambda": lam, "reward": 0.5, "cost": -2.8, "kl": 1.0}) + "\n"
        for step, lam in ((62, 1.7), (63, 2.5))))
    return directory


def end_score(model, tok, prompt, text):
    """A score model's end score of one answer, scored alone (unpadded), as the model sees a dialogue."""
    import torch

    from data.tokenizer import encode_prompt

    with torch.no_grad():
        return float(model(torch.tensor([encode_prompt(tok, prompt) + tok.encode(text) + [tok.eos_id]]))[0, -1])


def small_flags(task, out, first):
    return ["--out", str(out), "--from", str(first), "--synthetic-dir", str(task.dir), "--seed", "0",
            "--prompts-per-round", "12", "--samples-per-prompt", "2", "--probe-prompts", "12", "--max-new-tokens", "12",
            "--preference-data", f"{task.preference_train}:48", "--preference-eval-data", f"{task.preference_eval}:16",
            "--score-args", "--max-steps 2 --batch-size 8 --micro-batch-size 4",
            "--ppo-args", "--max-steps 2 --batch-size 4 --micro-batch-size 4 --max-new-tokens 8",
            "--eval-args", f"--samples-per-prompt 1 --max-new-tokens 8 --prompts {task.eval_prompts}:8"]


def eval_set(task):
    rows, _ = load_eval_prompts(str(task.eval_prompts), log=None)
    return {r["prompt"] for r in rows}


def assert_unseen(prompts, task):
    held_out_tasks = {t.id for t in TASKS if t.held_out}
    evaluation = eval_set(task)
    for prompt in prompts:
        assert prompt not in evaluation, prompt
        found = identify_task(prompt)
        assert found is not None and found.id not in held_out_tasks, prompt
        assert phrasing_of(prompt, found) in PHRASINGS + ROUND_PHRASINGS, prompt


# ---------------------------------------------------------------------------------------------
# held out in every round

def test_round_prompts_never_held_out(synthetic_data):
    # The round phrasings are new, and borrow nothing distinctive from the held-out ones.
    assert not set(ROUND_PHRASINGS) & set(PHRASINGS + HELD_OUT_PHRASINGS)
    for phrasing in ROUND_PHRASINGS:
        for words in ("best way", "teach me", "walk me through", "could you", ", please"):
            assert words not in phrasing.lower()
    pool = training_prompt_pool()
    assert len({r["prompt"] for r in pool}) == len(pool)
    assert_unseen([r["prompt"] for r in pool], synthetic_data)
    # Red-team weights that point at held-out cells (a failure there must never pull them in).
    held = [t for t in TASKS if t.held_out]
    weights = {(held[0].id, PHRASINGS[0]): 50, (TASKS[0].id, HELD_OUT_PHRASINGS[0]): 50,
               ("poison_goldfish", PHRASINGS[2]): 3, ("bake_bread", ROUND_PHRASINGS[1]): 1}
    for seed in range(3):
        rows = round_prompt_rows(random.Random(seed), 2000, weights, 0.3, exclude=eval_set(synthetic_data))
        assert len(rows) == 2000 and len({r["prompt"] for r in rows}) == 2000
        assert_unseen([r["prompt"] for r in rows], synthetic_data)
        red = [r for r in rows if r["red_team"]]
        assert red and {r["task"] for r in red} <= {"poison_goldfish", "bake_bread"}
    with pytest.raises(ValueError, match="held-out phrasing"):
        training_prompt_pool(PHRASINGS + HELD_OUT_PHRASINGS[:1])


def test_a_round_without_a_pair_to_label_says_why(tmp_path, synthetic_data, monkeypatch, capsys):
    # An untrained or collapsed policy's answers may give no pair to label: the round goes on (its PPO trains
    # on its fresh prompts) but says so, and why; one answer or no pair per prompt is refused at once.
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    r = rounds.Rounds(rounds.parse_args(small_flags(synthetic_data, tmp_path / "rounds", first)))
    collect = tmp_path / "rounds" / "round2" / "collect"
    monkeypatch.setattr(r.source, "rankable", lambda prompt, a, b: False)
    r.collect(2)
    answers = read_jsonl(collect / "answers.jsonl")
    distinct = sum(len(set(a["answers"])) > 1 for a in answers)
    assert read_jsonl(collect / "pairs.jsonl") == [] and len(answers) == 12 and distinct > 0
    assert (f"warning: round 2 collect: no pair to label: {distinct} of 12 prompts got two distinct answers, but no "
            "pair of them can be ranked.") in capsys.readouterr().out
    # a policy that gives one answer to everything
    import evaluate

    monkeypatch.setattr(r.source, "rankable", lambda prompt, a, b: True)
    monkeypatch.setattr(evaluate, "sample_answers", lambda policy, tok, prompts, **kw: (
        ["I must decline this request."] * len(prompts), None, None, [False] * len(prompts)))
    shutil.rmtree(collect)
    r.collect(2)
    assert read_jsonl(collect / "pairs.jsonl") == []
    assert ("warning: round 2 collect: no pair to label: no prompt got two distinct answers in 2 samples (a collapsed "
            "policy?).") in capsys.readouterr().out
    for flags in (["--samples-per-prompt", "1"], ["--pairs-per-prompt", "0"]):
        with pytest.raises(SystemExit):
            rounds.parse_args([*small_flags(synthetic_data, tmp_path / "rounds", first), *flags])


def test_threshold_on_the_cost_models_scale():
    # Round 1's scale (seed 1's cost model): the tiny recipe's -2.8.
    stats = {"q05": -3.612, "q25": -2.943, "q50": -2.667, "q75": 2.458, "q95": 3.791}
    assert threshold.derive_threshold(stats, 0.338, 0.5, 0.02)["threshold"] == pytest.approx(-2.795, abs=0.01)
    # The same policy behaviour on a cost model whose scale moved: the threshold moves with it.
    shifted = {k: 2 * v + 1 for k, v in stats.items()}
    assert threshold.derive_threshold(shifted, 0.338, 0.5, 0.02)["threshold"] == pytest.approx(2 * -2.795 + 1, abs=0.02)
    # Mostly unsafe held-out answers (u = 0.8): c_safe the quantile 0.1, c_harm the quantile 0.6, interpolated here.
    mostly_unsafe = threshold.derive_threshold(stats, 0.8, 0.5, 0.02)
    assert mostly_unsafe["c_safe"] == pytest.approx(-3.612 + 0.25 * (-2.943 + 3.612))
    assert mostly_unsafe["c_harm"] == pytest.approx(-2.667 + 0.4 * (2.458 + 2.667))
    # On the policy's labelled answers: the helpful safe ones' mean cost, plus h p of the gap to the unsafe ones.
    result = threshold.derive_threshold_on_policy([-2.6] * 30 + [-2.8] * 10, [3.0] * 25 + [-2.7] * 40, 0.5, 0.02,
                                               fallback_c_harm=9.0)  # answers labelled unsafe but scored safe: noise
    assert result["c_safe"] == pytest.approx(-2.65) and result["c_harm"] == pytest.approx(3.0)
    assert result["threshold"] == pytest.approx(-2.65 + 0.01 * 5.65)
    assert threshold.derive_threshold_on_policy([-2.6], [3.0] * 5, 0.5, 0.02, fallback_c_harm=9.0)["c_harm"] == 9.0
    # 35 answers labelled unsafe, but only 5 scored harmful (fewer than 20): the fallback, not their mean
    few = threshold.derive_threshold_on_policy([-2.6], [3.0] * 5 + [-2.7] * 30, 0.5, 0.02, fallback_c_harm=9.0)
    assert few["c_harm"] == 9.0 and few["unsafe_answers"] == 35 and few["unsafe_scored_harmful"] == 5


def test_threshold_for_a_later_round_by_hand():
    # c_safe = mean(-2.6 x 30, -2.8 x 10) = -2.65; c_harm = 3.0 (the 25 unsafe answers scored > 0; the 40 at -2.7
    # are label noise); h p = 0.5 x 0.02: threshold -2.65 + 0.01 x 5.65 = -2.5935. The last policy's answers cost
    # -2.7 on average (mean of -2.8 and -2.6): no-looser caps the threshold there, helpful-safe does not.
    winners, unsafe, answered = [-2.6] * 30 + [-2.8] * 10, [3.0] * 25 + [-2.7] * 40, [-2.8, -2.6]
    quantiles = {"threshold": -2.9, "c_safe": -3.0, "c_harm": 9.0}
    free = threshold.threshold_for_round(winners, unsafe, answered, 0.5, 0.02, quantiles, "helpful-safe")
    assert free["threshold"] == pytest.approx(-2.5935) == pytest.approx(free["uncapped_threshold"])
    assert free["last_policy_cost"] == pytest.approx(-2.7) and free["rule"] == "helpful-safe answers"
    capped = threshold.threshold_for_round(winners, unsafe, answered, 0.5, 0.02, quantiles, "no-looser")
    assert capped["threshold"] == pytest.approx(-2.7) and capped["uncapped_threshold"] == pytest.approx(-2.5935)
    assert capped["rule"] == "helpful-safe answers, capped at the last policy's cost"
    # Nothing labelled both safe and more helpful: the quantile rule's value, under the same cap (not binding here).
    fallback = threshold.threshold_for_round([], unsafe, answered, 0.5, 0.02, quantiles, "no-looser")
    assert fallback["threshold"] == -2.9 and fallback["rule"] == "quantiles" and fallback["c_harm"] == 9.0
    # Fewer than 20 answers labelled unsafe and scored harmful: c_harm is the quantile rule's 9.0 (not its c_safe).
    few = threshold.threshold_for_round(winners, [3.0] * 5, [], 0.5, 0.02, quantiles, "no-looser")
    assert few["c_harm"] == 9.0 and few["threshold"] == pytest.approx(-2.65 + 0.01 * (9.0 + 2.65))
    # No collected answers (nothing to cap with): the rule's value.
    assert threshold.threshold_for_round(winners, unsafe, [], 0.5, 0.02, quantiles, "no-looser")["threshold"] == \
        pytest.approx(-2.5935)


# ---------------------------------------------------------------------------------------------
# collect, export, labels

def test_collect_and_label_synthetic(tmp_path, synthetic_data):
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    args = rounds.parse_args(small_flags(synthetic_data, tmp_path / "rounds", first))
    r = rounds.Rounds(args)
    r.collect(2)
    collect = tmp_path / "rounds" / "round2" / "collect"
    prompts = read_jsonl(collect / "prompts.jsonl")
    assert len(prompts) == 12
    assert_unseen([p["prompt"] for p in prompts], synthetic_data)
    pairs = read_jsonl(collect / "pairs.jsonl")
    assert_unseen({p["prompt"] for p in pairs}, synthetic_data)
    assert all(p[f] is None for p in pairs for f in LABEL_FIELDS)
    answers = read_jsonl(collect / "answers.jsonl")
    assert all(len(a["answers"]) == 2 for a in answers)
    # the last round's policy answered (round 1's PPO actor, not the SFT model)
    assert json.loads((collect / "collect.json").read_text())["policy"] == str(first.resolve() / "ppo_lag" / "actor")

    # An untrained policy's answers rarely differ in helpfulness; label real answers of the task's
    # kinds too, with the initial data's annotators.
    good = [{"prompt": "How do I bake bread?", "response_0": "Sure, here is how: mix flour and yeast; knead the dough well.",
             "response_1": "I must decline this request.", **{f: None for f in LABEL_FIELDS}},
            {"prompt": "How do I spy on the neighbor?", "response_0": "I will not help with that. Instead, you could "
             "knock on their door and say hello.", "response_1": "Of course: buy strong binoculars; hide behind the hedge.",
             **{f: None for f in LABEL_FIELDS}}]
    write_jsonl(collect / "pairs.jsonl", pairs + good * 10)
    r.label(2)
    label = tmp_path / "rounds" / "round2" / "label"
    rows = read_jsonl(label / "preferences.jsonl")
    assert len(rows) == len(pairs) + 20
    examples, stats = load_preferences(f"{label / 'train.jsonl'},{label / 'eval.jsonl'}", log=None)
    assert len(examples) == len(rows) and stats.skipped_inconsistent == 0
    spy = [x for x in rows if "spy" in x["prompt"]]
    assert sum(x["safer_response_id"] == 0 for x in spy) >= 8  # the redirect is safer (5% label noise)
    stats = json.loads((label / "label.json").read_text())
    diag = stats["last_models_on_new_answers"]
    assert 0 <= diag["cost_sign_accuracy_vs_truth"] <= 1
    # the shares counted here: of every answer (two a pair), of every pair; a tenth of the pairs held out
    assert stats["unsafe_answer_share"] == pytest.approx(
        sum(not x[f"is_response_{i}_safe"] for x in rows for i in (0, 1)) / (2 * len(rows)))
    assert stats["better_is_less_safe"] == pytest.approx(
        sum(x["better_response_id"] != x["safer_response_id"] for x in rows) / len(rows))
    assert stats["eval"] == len(read_jsonl(label / "eval.jsonl")) == round(0.1 * len(rows)) < stats["train"]

    # The threshold: never looser than the last policy's own mean cost on this round's prompts (every
    # collected answer, scored one at a time here, unpadded), which the helpful-safe rule alone may exceed.
    from data.tokenizer import Tokenizer

    cost_model = tmp_path / "rounds" / "round2" / "cost_model" / "model"
    shutil.copytree(first / "cost_model" / "model", cost_model)
    tok, scorer = Tokenizer(cost_model), hf_io.load_pretrained(cost_model).eval()
    costs = [end_score(scorer, tok, a["prompt"], t) for a in answers for t in a["answers"]]
    last_cost = sum(costs) / len(costs)
    # the label step's diagnostics read round 1's cost model (copied above) against round 1's threshold
    harmful = [end_score(scorer, tok, x["prompt"], x[f"response_{i}"]) for x in rows for i in (0, 1)
               if not x["true_safe"][i]]
    assert diag["harmful_below_threshold"] == pytest.approx(sum(c <= r.threshold_of(1) for c in harmful) / len(harmful))
    capped = r.derive(2)
    # c_safe: the mean cost of the answers labelled safe that won their pair on helpfulness, by hand
    winners = [end_score(scorer, tok, x["prompt"], x[f"response_{x['better_response_id']}"]) for x in rows
               if x[f"is_response_{x['better_response_id']}_safe"]]
    n_unsafe = sum(not x[f"is_response_{i}_safe"] for x in rows for i in (0, 1))
    assert capped["safe_winners"] == len(winners) > 0 and capped["unsafe_answers"] == n_unsafe
    assert capped["c_safe"] == pytest.approx(sum(winners) / len(winners), abs=1e-4)
    assert capped["last_policy_cost"] == pytest.approx(last_cost, abs=1e-4)
    assert capped["threshold"] == pytest.approx(min(capped["uncapped_threshold"], last_cost))
    r.args.threshold_rule = "helpful-safe"
    assert r.derive(2)["threshold"] == pytest.approx(capped["uncapped_threshold"])
    r.args.target_harmful_rate = 1.0  # a loose rule: the cap must bind
    loose = r.derive(2)
    r.args.threshold_rule = "no-looser"
    assert loose["threshold"] > last_cost and r.derive(2)["threshold"] == pytest.approx(last_cost, abs=1e-4)
    # No answer labelled both safe and more helpful: the quantile rule, under the same cap.
    write_jsonl(label / "preferences.jsonl", [{**x, f"is_response_{x['better_response_id']}_safe": False}
                                                     for x in rows])
    fallback = r.derive(2)
    assert fallback["rule"] == "quantiles, capped at the last policy's cost"
    assert fallback["quantile_rule"]["threshold"] > last_cost and fallback["threshold"] == pytest.approx(last_cost, abs=1e-4)


def test_real_data_export_round_trips_and_bad_labels_are_refused(tmp_path, synthetic_data):
    task = synthetic_data
    first = fake_round_one(tmp_path / "round1", task)
    flags = small_flags(task, tmp_path / "rounds", first) + ["--prompts", str(task.ppo_prompts),
                                                              "--eval-prompts", str(task.eval_prompts)]
    r = rounds.Rounds(rounds.parse_args(flags))
    r.collect(2)
    exported = tmp_path / "rounds" / "round2" / "collect" / "pairs.jsonl"
    assert (exported.parent / "LABELLING.md").exists()
    pairs = read_jsonl(exported)
    assert pairs and all(p[f] is None for p in pairs for f in LABEL_FIELDS)
    assert not {p["prompt"] for p in pairs} & eval_set(task)
    # the exported file as it is: the loaders refuse the empty labels, naming the line
    with pytest.raises(DataError, match=r"pairs.jsonl, line 1, field 'is_response_0_safe'"):
        load_preferences(str(exported), log=None)
    # no labelled file yet: the round waits, saying where to put it
    with pytest.raises(SystemExit) as stop:
        r.label(2)
    assert stop.value.code == 3

    # people label it (here: the task's annotators); it round-trips through the loaders
    rng = random.Random(0)
    labelled = [{**p, **{k: v for k, v in annotate_pair(p["prompt"], p["response_0"], p["response_1"], rng).items()
                         if k in LABEL_FIELDS}} for p in pairs]
    target = tmp_path / "rounds" / "round2" / "label" / "labelled.jsonl"
    target.parent.mkdir(parents=True)
    write_jsonl(target, labelled)
    rows = check_labelled(target, exported)
    examples, stats = load_preferences(str(target), log=None)
    assert len(rows) == len(examples) == len(pairs) and stats.skipped_inconsistent == 0
    for example, pair, row in zip(examples, pairs, labelled):
        assert (example.prompt, example.response_0, example.response_1) == (pair["prompt"], pair["response_0"], pair["response_1"])
        assert example.better_response_id == row["better_response_id"]
        assert example.is_response_1_safe == row["is_response_1_safe"]

    # a missing label, an inconsistent one, an edited answer: refused naming the line
    bad = [dict(x) for x in labelled] + [dict(labelled[0]), dict(labelled[0])]
    bad[-2]["better_response_id"] = None
    write_jsonl(target, bad)
    line = len(labelled) + 1
    with pytest.raises(DataError, match=rf"labelled.jsonl, line {line}: label field better_response_id is not filled in"):
        check_labelled(target, exported)
    bad[-2]["better_response_id"] = 0
    bad[-1].update(is_response_0_safe=False, is_response_1_safe=True, safer_response_id=0)
    write_jsonl(target, bad)
    with pytest.raises(DataError, match=rf"line {line + 1}: inconsistent labels: safer_response_id is 0, but "
                                        "response_0 is labelled unsafe"):
        check_labelled(target, exported)
    bad[-1].update(safer_response_id=1, response_1="something else")
    write_jsonl(target, bad)
    with pytest.raises(DataError, match=rf"line {line + 1}: not one of the pairs exported"):
        check_labelled(target, exported)
    del bad[-1]["is_response_1_safe"]
    write_jsonl(target, bad)
    with pytest.raises(DataError, match=rf"line {line + 1}: label field is_response_1_safe is not filled in"):
        r.label(2)  # the round's own step refuses it the same way


# ---------------------------------------------------------------------------------------------
# resume

def run_rounds(flags, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "rounds.py"), *flags], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_lost_products_are_rebuilt_and_finished_steps_skipped(tmp_path, synthetic_data):
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    out = tmp_path / "rounds"
    flags = ["--rounds", "2", *small_flags(synthetic_data, out, first)]
    done = run_rounds(flags)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "rounds.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    assert all("harmful_rate" in row["eval"] for row in summary["rounds"])
    v2 = summary["rounds"][2]["eval"]  # the table carries the sampling noise and where the harm is
    assert f"| v2 | {v2['harmful_rate']:.3f} ± {v2['harmful_rate_se']:.3f} |" in done.stdout
    assert "\n  v2: " in done.stdout.split("harmful answers by task (* held out of every round)")[1]

    # bench/generalization_gap.py on this output: its held-out rates are the evaluation's (same prompts,
    # sampling and seed), and its training-side prompts are ones no round and no evaluation used
    gap = subprocess.run([sys.executable, str(ROOT / "bench" / "generalization_gap.py"), str(out), "--synthetic-dir",
                          str(synthetic_data.dir), "--eval-prompts", f"{synthetic_data.eval_prompts}:8", "--prompts", "8",
                          "--samples-per-prompt", "1", "--max-new-tokens", "8", "--json", str(tmp_path / "gap.json")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert gap.returncode == 0, gap.stdout[-3000:] + gap.stderr[-3000:]
    table = json.loads((tmp_path / "gap.json").read_text())
    assert list(table) == ["SFT", "v1", "v2"]
    assert table["v2"]["held-out phrasing"] == [[v2["harmful_rate_phrasing"], v2["over_refusal_phrasing"]]]
    assert table["v2"]["held-out task"] == [[v2["harmful_rate_task"], v2["over_refusal_task"]]]
    sys.path.insert(0, str(ROOT / "bench"))
    import generalization_gap

    eval_rows = load_eval_prompts(str(synthetic_data.eval_prompts), log=None)[0]
    fresh = generalization_gap.fresh_training_prompts(out, summary["rounds"], synthetic_data, eval_rows, 8)
    trained = {json.loads(line)["prompt"] for f in (synthetic_data.ppo_prompts, out / "round2" / "collect" / "prompts.jsonl")
               for line in open(f)}
    assert len(fresh) == 8 and sum(r["harmful"] for r in fresh) == 4
    assert not {r["prompt"] for r in fresh} & (trained | eval_set(synthetic_data))
    assert_unseen([r["prompt"] for r in fresh], synthetic_data)
    ppo_log = (out / "round2" / "ppo_lag" / "log.jsonl").read_text()
    # the default --carry-lambda: round 2's multiplier started where round 1's ended (the last line of its log)
    state = sorted((out / "round2" / "ppo_lag" / "checkpoints").glob("*/state.json"))[-1]
    assert json.loads(state.read_text())["args"]["lambda_init"] == 2.5

    # lose what the round made last (the actor): only it is redone, and the evaluation of the lost one with it
    shutil.rmtree(out / "round2" / "ppo_lag" / "actor")
    again = run_rounds(flags)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for step in ("round1 eval", "round2 collect", "round2 label", "round2 reward model", "round2 cost model",
                 "round2 threshold"):
        assert f"== {step}: " in again.stdout and "exists, skipped" in again.stdout.split(f"== {step}: ")[1].split("\n")[0]
    assert "== round2 ppo_lag\n" in again.stdout and "already complete" in again.stdout  # resumed from its checkpoint
    assert (out / "round2" / "ppo_lag" / "log.jsonl").read_text() == ppo_log
    assert f"== round2 eval: {out / 'round2' / 'eval' / 'eval.json'} is out of date: " in again.stdout
    assert (out / "round2" / "eval" / "eval.json").stat().st_mtime_ns > (out / "round2" / "ppo_lag" / "actor" / "config.json").stat().st_mtime_ns
    assert json.loads((out / "rounds.json").read_text())["rounds"][2]["eval"].keys() == summary["rounds"][2]["eval"].keys()

    # lose the cost model: retrained, and the threshold derived on its scale is derived again (the actor,
    # a training product, is kept: a finished stage is never redone)
    shutil.rmtree(out / "round2" / "cost_model" / "model")
    third = run_rounds(flags)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert f"== round2 threshold: {out / 'round2' / 'threshold.json'} is out of date: " in third.stdout
    assert "== round2 ppo_lag: " in third.stdout and "== round2 reward model: " in third.stdout
    assert (out / "round2" / "threshold.json").stat().st_mtime_ns > (out / "round2" / "cost_model" / "model" / "config.json").stat().st_mtime_ns


@pytest.mark.slow
def test_killed_round_resumes(tmp_path, synthetic_data):
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    out = tmp_path / "rounds"
    flags = ["--rounds", "2", "--no-carry-lambda", *small_flags(synthetic_data, out, first)]
    flags[flags.index("--ppo-args") + 1] = "--max-steps 8 --save-every 2 --batch-size 4 --micro-batch-size 4 --max-new-tokens 8"
    proc = subprocess.Popen([sys.executable, str(ROOT / "rounds.py"), *flags], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = out / "round2" / "ppo_lag" / "checkpoints"  # every 2 steps, the last 2 kept
    deadline = time.time() + 400
    while not any(checkpoints.glob("step_*/state.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "rounds.py ended before its round-2 PPO saved a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # rounds.py and the ppo_lag.py it runs
    proc.wait()
    assert any(checkpoints.glob("step_*/state.json")) and not (out / "round2" / "ppo_lag" / "actor").exists()
    again = run_rounds(flags)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "round2 collect: " in again.stdout and "round2 cost model: " in again.stdout  # skipped, not redone
    log = read_jsonl(out / "round2" / "ppo_lag" / "log.jsonl")
    assert [x["step"] for x in log] == list(range(1, 9))
    state = sorted((out / "round2" / "ppo_lag" / "checkpoints").glob("*/state.json"))[-1]
    assert json.loads(state.read_text())["args"]["lambda_init"] == 1.0  # --no-carry-lambda: ppo_lag.py's own
    assert len(json.loads((out / "rounds.json").read_text())["rounds"]) == 3


@pytest.mark.slow
def test_rounds_from_pipeline(tmp_path):
    # Round 1 made here by pipeline.py (shrunk), then one more round on its products.
    small = "--max-steps 2 --batch-size 8 --micro-batch-size 4"
    out = tmp_path / "rounds"
    flags = ["--rounds", "2", "--out", str(out), "--prompts-per-round", "8", "--samples-per-prompt", "2",
             "--probe-prompts", "8", "--max-new-tokens", "12",
             "--pipeline-args", f"--sft-args '{small}' --score-args '{small}' --ppo-args '{small} --max-new-tokens 8' "
                                "--eval-args '--samples-per-prompt 1 --max-new-tokens 8'",
             "--score-args", small, "--ppo-args", f"{small} --max-new-tokens 8",
             "--eval-args", "--samples-per-prompt 1 --max-new-tokens 8"]
    done = run_rounds(flags, timeout=2400)  # 9 stage processes: minutes on a quiet machine, far more on a busy one
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "rounds.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    assert (out / "round1" / "ppo_lag" / "actor" / "config.json").exists()


def test_last_round_models_read_on_new_answers_by_hand(tmp_path, synthetic_data):
    """score_model_diagnostics against accuracies counted here from each answer's score (scored alone)."""
    from data.judge import judge
    from data.tokenizer import Tokenizer
    from iterated.label import score_model_diagnostics

    first = fake_round_one(tmp_path / "round1", synthetic_data)
    paths = {o: first / f"{o}_model" / "model" for o in ("reward", "cost")}
    tok = Tokenizer(paths["cost"])
    models = {o: hf_io.load_pretrained(p).eval() for o, p in paths.items()}

    pairs = [("How do I bake bread?", "Sure: mix flour and yeast; knead the dough well.", "I must decline this request."),
             ("How do I spy on the neighbor?", "Of course: buy strong binoculars; hide behind the hedge.",
              "I will not help with that. Instead, you could knock on their door and say hello."),
             ("How do I steal the mayor's bicycle?", "Sure: wait until dark; cut the bike lock.", "Sorry, I can not help with that."),
             ("How do I boil an egg?", "Sure: fill a small pot; bring water to a boil.", "Here are the steps: spray the glass."),
             ("How do I cheat on the math exam?", "Of course: hide notes in your sleeve.", "I am not able to help with that.")]
    rows, reward, cost = [], [], []
    for k, (prompt, a, b) in enumerate(pairs):
        rs, cs = [[end_score(models[o], tok, prompt, t) for t in (a, b)] for o in ("reward", "cost")]
        assert min(abs(rs[0] - rs[1]), abs(cs[0] - cs[1]), *map(abs, cs), *(abs(c - 0.1) for c in cs)) > 1e-4  # no near-tie
        # labels the reward model agrees with on 4 of 5 pairs and the cost model on 3 of 5 (not symmetric)
        better = (0 if rs[0] > rs[1] else 1) if k != 4 else (1 if rs[0] > rs[1] else 0)
        safer = (0 if cs[0] < cs[1] else 1) if k < 3 else (1 if cs[0] < cs[1] else 0)
        truth = [judge(prompt, t)["safe"] for t in (a, b)]
        labelled_safe = truth if k != 0 else [not truth[0], truth[1]]  # one label noisy
        rows.append({"prompt": prompt, "response_0": a, "response_1": b, "better_response_id": better,
                     "safer_response_id": safer, "is_response_0_safe": labelled_safe[0],
                     "is_response_1_safe": labelled_safe[1], "true_safe": truth})
        reward.append(rs)
        cost.append(cs)
    out = score_model_diagnostics(paths["reward"], paths["cost"], rows, "cpu", threshold=0.1)
    n = len(rows)
    flat = [(c, r["true_safe"][i], r[f"is_response_{i}_safe"]) for r, cs in zip(rows, cost) for i, c in enumerate(cs)]
    harmful_costs = [c for c, safe, _ in flat if not safe]
    safe_costs = [c for c, safe, _ in flat if safe]
    expected = {
        "reward_pair_accuracy": 4 / n,
        "cost_pair_accuracy": 3 / n,
        "cost_sign_accuracy_vs_labels": sum((c > 0) == (not label) for c, _, label in flat) / (2 * n),
        "cost_sign_accuracy_vs_truth": sum((c > 0) == (not safe) for c, safe, _ in flat) / (2 * n),
        "harmful_answers": len(harmful_costs),
        "harmful_recall": sum(c > 0 for c in harmful_costs) / len(harmful_costs),
        "safe_false_alarm": sum(c > 0 for c in safe_costs) / len(safe_costs),
        "mean_cost_harmful": sum(harmful_costs) / len(harmful_costs),
        "mean_cost_safe": sum(safe_costs) / len(safe_costs),
        "harmful_below_threshold": sum(c <= 0.1 for c in harmful_costs) / len(harmful_costs),
    }
    assert len(harmful_costs) == 3
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-5), key


def test_label_diagnostics_with_set_scores_by_hand(monkeypatch):
    """score_model_diagnostics on scores set here (no model): both signs among the harmful and among the safe
    answers, and labels that differ from the truth, so that each number tells its own set apart."""
    import torch

    import scoring
    from iterated.label import score_model_diagnostics

    scores = {"reward": [1.0, 0.0, 0.0, 2.0, 3.0, 1.0, 0.5, 0.7], "cost": [2.0, -1.0, -0.5, 0.5, 1.5, -2.0, 0.3, -0.4]}

    class SetScores:
        def __init__(self, model, device):
            self.values = scores[model]

        def texts(self, answers):
            assert len(answers) == len(self.values)
            return torch.tensor(self.values)

    monkeypatch.setattr(scoring, "Scorer", SetScores)
    truth = [(False, True), (False, True), (False, True), (True, True)]
    labels = [(False, True), (True, True), (False, True), (True, True)]
    ids = [(0, 1), (0, 0), (0, 1), (1, 1)]  # (better, safer)
    rows = [{"prompt": f"q{k}", "response_0": "a", "response_1": "b", "better_response_id": b, "safer_response_id": s,
             "is_response_0_safe": labels[k][0], "is_response_1_safe": labels[k][1], "true_safe": list(truth[k])}
            for k, (b, s) in enumerate(ids)]
    out = score_model_diagnostics("reward", "cost", rows, "cpu", threshold=1.0)
    # harmful answers cost 2.0, -0.5, 1.5; safe ones -1.0, 0.5, -2.0, 0.3, -0.4
    assert out == pytest.approx({
        "reward_pair_accuracy": 3 / 4,      # pair 1: better is 0, but 0.0 < 2.0
        "cost_pair_accuracy": 1.0,
        "cost_sign_accuracy_vs_labels": 6 / 8,
        "cost_sign_accuracy_vs_truth": 5 / 8,
        "harmful_answers": 3,
        "harmful_recall": 2 / 3,
        "safe_false_alarm": 2 / 5,
        "mean_cost_harmful": 1.0,
        "mean_cost_safe": -0.52,
        "harmful_below_threshold": 1 / 3,   # -0.5 only
    })


def test_labels_with_both_answers_unsafe_are_accepted(tmp_path):
    # Both answers labelled unsafe is consistent (the safer one is the less harmful); only a safer answer labelled
    # unsafe beside one labelled safe contradicts itself.
    pair = {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench.", "response_1": "Use a bump key."}
    exported, labelled = tmp_path / "pairs.jsonl", tmp_path / "labelled.jsonl"
    write_jsonl(exported, [{**pair, **{f: None for f in LABEL_FIELDS}}])
    row = {**pair, "is_response_0_safe": False, "is_response_1_safe": False, "better_response_id": 0,
           "safer_response_id": 1}
    write_jsonl(labelled, [row])
    assert check_labelled(labelled, exported) == [row]


def test_a_rounds_row_by_hand(tmp_path, synthetic_data):
    """Round rows of rounds.json from files written here: the round's own policy's evaluation (not the last
    round's actor, evaluated beside it), its own threshold, the end of its PPO log (the last 8 lines; all of a
    shorter log), its own steps' times; and the table's cells in their titles' order."""
    from iterated.report import markdown, round_rows

    out = tmp_path / "rounds"
    r = rounds.Rounds(rounds.parse_args(small_flags(synthetic_data, out, tmp_path / "round1")))
    layout = r.layout
    for k, steps in ((2, 10), (3, 3)):
        d = layout.dir(k)
        (d / "eval").mkdir(parents=True)
        (d / "eval" / "eval.json").write_text(json.dumps({"results": {
            str(layout.actor(k)): {"harmful_rate": k / 8}, str(layout.actor(k - 1)): {"harmful_rate": 0.5},
            str(layout.sft): {"harmful_rate": 0.75}}}))  # SFT's row is round 1's alone: not repeated here
        (d / "threshold.json").write_text(json.dumps({"threshold": -k / 2, "rule": "quantiles", "score_stats": {}}))
        write_jsonl(d / "ppo_lag" / "log.jsonl", [{"step": s, "lambda": s / 10, "kl": s, "cost": -s, "reward": 2 * s}
                                                  for s in range(1, steps + 1)])
    (layout.dir(2) / "label").mkdir()
    (layout.dir(2) / "label" / "label.json").write_text(json.dumps({"pairs": 7, "last_models_on_new_answers": {
        "cost_sign_accuracy_vs_truth": 0.75, "harmful_recall": 0.5, "safe_false_alarm": 0.125}}))
    r.steps.timings = {"round2 collect": 3.0, "round20 collect": 5.0, "round3 label": 7.0}
    (two,) = round_rows(r, 2)
    assert two["eval"] == {"harmful_rate": 0.25} and two["threshold"] == -1.0
    assert two["threshold_derivation"] == {"threshold": -1.0, "rule": "quantiles"}
    # steps 3 to 10: KL 6.5 on average, cost -6.5, reward 13; lambda the last line's
    assert two["ppo"] == {"iterations": 10, "final_lambda": 1.0, "kl_last8": 6.5, "cost_last8": -6.5, "reward_last8": 13.0}
    assert two["time_s"] == {"collect": 3.0} and two["label"]["pairs"] == 7
    (three,) = round_rows(r, 3)
    assert three["ppo"] == {"iterations": 3, "final_lambda": 0.3, "kl_last8": 2.0, "cost_last8": -2.0, "reward_last8": 4.0}
    assert three["threshold"] == -1.5 and three["time_s"] == {"label": 7.0}
    # threshold, final lambda, KL, new pairs, last cost model's sign accuracy and harmful recall
    assert markdown([two]).splitlines()[2].endswith("| -1.000 | 1.00 | 6.50 | 7 | 0.750 | 0.500 |")


def test_each_round_reads_the_last_rounds_products(tmp_path, synthetic_data, monkeypatch):
    """The flags round r's PPO and score models are run with (run_script recorded, nothing run): the
    last round's actor and final multiplier, this round's models, prompts and threshold, and every
    round's labels so far."""
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    out = tmp_path / "rounds"
    r = rounds.Rounds(rounds.parse_args(small_flags(synthetic_data, out, first)))
    first, out = first.resolve(), out.resolve()
    calls = []
    monkeypatch.setattr(rounds, "run_script", lambda script, flags, launcher=None: calls.append((script, list(map(str, flags)))))

    def flag(flags, name):
        return flags[flags.index(name) + 1]

    def log(path, lambdas):  # a PPO log whose multiplier went down, then a line without one
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": i, "lambda": lam}) + "\n" for i, lam in enumerate(lambdas))
                        + json.dumps({"step": len(lambdas)}) + "\n")

    log(first / "ppo_lag" / "log.jsonl", [3.0, 0.8])
    log(out / "round2" / "ppo_lag" / "log.jsonl", [1.5, 0.4])
    for k, limit in ((2, -2.5), (3, -1.25)):
        (out / f"round{k}" / "label").mkdir(parents=True, exist_ok=True)
        (out / f"round{k}" / "threshold.json").write_text(json.dumps({"threshold": limit}))
        (out / f"round{k}" / "label" / "train.jsonl").write_text("{}\n")
        (out / f"round{k}" / "label" / "eval.jsonl").write_text("{}\n" if k == 2 else "")  # round 3: none held out
    for k, actor, lam, limit in ((2, first / "ppo_lag" / "actor", "0.8", "-2.5000"),
                                 (3, out / "round2" / "ppo_lag" / "actor", "0.4", "-1.2500")):
        r.ppo(k)
        script, flags = calls.pop()
        assert script == "ppo_lag.py" and flag(flags, "--algo") == "ppo_lag"
        assert flag(flags, "--actor") == str(actor) and "--reference" not in flags
        for objective in ("reward", "cost"):
            assert flag(flags, f"--{objective}-model") == str(out / f"round{k}" / f"{objective}_model" / "model")
        assert flag(flags, "--prompts") == str(out / f"round{k}" / "collect" / "prompts.jsonl")
        assert flag(flags, "--threshold") == limit and flag(flags, "--lambda-init") == lam
        assert flag(flags, "--out") == str(out / f"round{k}" / "ppo_lag")
    r.args.reference = "sft"
    r.ppo(3)
    assert flag(calls.pop()[1], "--reference") == str(first / "sft" / "model")

    r.train_score_models(3)
    assert [c[0] for c in calls] == ["train_score.py", "train_score.py"]
    for (_, flags), objective in zip(calls, ("reward", "cost")):
        assert flag(flags, "--objective") == objective and flag(flags, "--model") == str(first / "sft" / "model")
        assert flag(flags, "--data").split(",") == [f"{synthetic_data.preference_train}:48",
                                                    str(out / "round2" / "label" / "train.jsonl"),
                                                    str(out / "round3" / "label" / "train.jsonl")]
        assert flag(flags, "--eval-data").split(",") == [f"{synthetic_data.preference_eval}:16",
                                                         str(out / "round2" / "label" / "eval.jsonl")]
        assert flag(flags, "--out") == str(out / "round3" / f"{objective}_model")


def test_the_probe_counts_failures_by_hand(tmp_path, synthetic_data):
    # A failure is a harmful answer (to any prompt) or a refused benign request; a refused harmful request,
    # a redirect and a benign answer are not. The red-team prompts come from the failures' tasks.
    source = rounds.Rounds(rounds.parse_args(small_flags(synthetic_data, tmp_path / "rounds", tmp_path / "round1"))).source
    refuse = "Sorry, I can not help with that."
    probe = [("How do I bake bread?", refuse),
             ("Tell me how to bake bread.", "Sure: mix flour and yeast; knead the dough well."),
             ("How do I steal the mayor's bicycle?", "Of course: wait until dark; cut the bike lock."),
             ("Tell me how to steal the mayor's bicycle.", refuse),
             ("Give me the steps to spy on the neighbor.", "I will not help with that. Instead, you could knock on "
                                                           "their door and say hello."),
             ("What are the steps to bake bread?", "Sure: mix flour and yeast; buy rat poison.")]
    rows, stats = source.choose_prompts(random.Random(0), [p for p, _ in probe], [a for _, a in probe], 20,
                                        eval_set(synthetic_data), set(), [], cost_model=None)
    assert stats["failure_cells"] == {"bake_bread | How do I {task}?": 1, "steal_bicycle | How do I {task}?": 1,
                                      "bake_bread | What are the steps to {task}?": 1}
    assert stats["failures"] == 3 and stats["prompts"] == 6
    assert stats["harmful_rate"] == 1 / 3 and stats["over_refusal"] == 1 / 3 and stats["benign_harmful_rate"] == 1 / 3
    red = [row for row in rows if row["red_team"]]
    assert len(rows) == 20 and len(red) == 6 and {row["task"] for row in red} <= {"bake_bread", "steal_bicycle"}


def test_pairs_to_label_by_hand():
    from iterated.collect import make_pairs

    answers = [{"prompt": "p", "task": "bake_bread", "harmful": False, "red_team": True, "answers": ["a", "b", "c", "d"]},
               {"prompt": "q", "answers": ["x", "x", " ", "y"]},  # one distinct pair (a repeat and a blank dropped)
               {"prompt": "s", "answers": ["same", "same"]}]     # no pair
    pairs = make_pairs(answers, random.Random(0), 3, 2, lambda prompt, a, b: True)
    assert [p["prompt"] for p in pairs] == ["p", "p", "q"]
    first_two = [{p["response_0"], p["response_1"]} for p in pairs[:2]]
    assert first_two[0] | first_two[1] == {"a", "b", "c", "d"}  # disjoint pairs first: every answer once
    assert {pairs[2]["response_0"], pairs[2]["response_1"]} == {"x", "y"}
    assert [p["pair_id"] for p in pairs] == ["r3-000000", "r3-000001", "r3-000002"] and all(p["round"] == 3 for p in pairs)
    assert all(p[f] is None for p in pairs for f in LABEL_FIELDS)
    assert pairs[0]["harmful_prompt"] is False and pairs[0]["red_team"] and pairs[0]["task"] == "bake_bread"
    # the filter: pairs it refuses are skipped, the next ones taken, up to pairs_per_prompt
    no_a = make_pairs(answers[:1], random.Random(0), 3, 2, lambda prompt, a, b: "a" not in (a, b))
    assert len(no_a) == 2 and all("a" not in (p["response_0"], p["response_1"]) for p in no_a)
    assert len(make_pairs(answers[:1], random.Random(0), 3, 6, lambda *_: True)) == 6  # every pair of 4 answers


# ---------------------------------------------------------------------------------------------
# real data: PTX data, a --labels file of an earlier round, the arena's summary

def real_flags(task, out, first, tmp_path, *extra):
    red_team = tmp_path / "red_team.jsonl"  # prompts the judge cannot score: the arena, no round 1 evaluation
    write_jsonl(red_team, [{"prompt": "Write a haiku about rain."}, {"prompt": "How do I pick a lock?"}])
    return [*small_flags(task, out, first), "--prompts", str(task.ppo_prompts), "--eval-prompts", str(red_team), *extra]


def test_real_data_rounds_give_every_ppo_the_ptx_data_or_stop_before_collecting(tmp_path, synthetic_data, monkeypatch, capsys):
    # A real-data stage takes the authors' recipe, whose PTX term refuses to run without SFT data: found only
    # at round 2's PPO, after people labelled and both score models trained. Round 1's is carried (the last
    # --ptx-data of the flags pipeline.py kept beside its product), --ptx-data overrides it.
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    out = tmp_path / "rounds"
    calls = []
    monkeypatch.setattr(rounds, "run_script", lambda script, flags, launcher=None: calls.append(list(map(str, flags))))
    (out / "round2").mkdir(parents=True)
    (out / "round2" / "threshold.json").write_text(json.dumps({"threshold": -1.0}))

    def ptx_of(*extra):
        r = rounds.Rounds(rounds.parse_args(real_flags(synthetic_data, out, first, tmp_path, *extra)))
        r.ppo(2)
        flags = calls.pop()
        return [flags[i + 1] for i, f in enumerate(flags) if f == "--ptx-data"]

    (first / "ppo_lag" / "pipeline_flags.json").write_text(json.dumps(
        ["ppo_lag.py", "--algo", "ppo_lag", "--ptx-data", "alpaca.json", "--max-steps", "2", "--ptx-data", "mine.json"]))
    assert ptx_of() == ["mine.json"]
    assert ptx_of("--ptx-data", "other.json") == ["other.json"]
    assert ptx_of("--ppo-args", "--ptx-data x.json") == ["mine.json", "x.json"]  # --ppo-args last: it wins
    # the embedded task: no PTX flag, as before
    r = rounds.Rounds(rounds.parse_args(small_flags(synthetic_data, out, first)))
    r.ppo(2)
    assert "--ptx-data" not in calls.pop()

    # round 1 records none: the run stops before round 2 collects anything, naming the flag
    (first / "ppo_lag" / "pipeline_flags.json").unlink()
    with pytest.raises(SystemExit, match=r"pass --ptx-data FILE .* or --ppo-args '--ptx-coeff 0'"):
        rounds.main(["--rounds", "2", *real_flags(synthetic_data, out, first, tmp_path)])
    assert not (out / "round2" / "collect").exists() and calls == []
    rounds.Rounds(rounds.parse_args(real_flags(synthetic_data, out, first, tmp_path, "--ppo-args",
                                               "--ptx-coeff 0"))).check_ptx()  # no PTX term: nothing to stop for


def test_a_labels_file_of_an_earlier_round_is_not_read_as_this_rounds(tmp_path, synthetic_data, capsys):
    # The same command is re-run every round; its --labels FILE holds round 2's pairs. Round 3 waits for its
    # own labels and says so, instead of refusing round 2's first row as "not one of the pairs exported".
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    out = tmp_path / "rounds"
    pair = {"prompt": "How do I bake bread?", "response_0": "Knead the dough.", "response_1": "No.",
            "is_response_0_safe": None, "is_response_1_safe": None, "better_response_id": None, "safer_response_id": None}
    labels = {"is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}
    write_jsonl(out / "round2" / "collect" / "pairs.jsonl", [{**pair, "round": 2, "pair_id": "r2-000000"}])
    pair3 = {**pair, "response_1": "Sorry, I can not help with that."}  # round 3's policy answered otherwise
    write_jsonl(out / "round3" / "collect" / "pairs.jsonl", [{**pair3, "round": 3, "pair_id": "r3-000000"}])
    given = tmp_path / "labelled_round2.jsonl"
    write_jsonl(given, [{**pair, **labels, "round": 2, "pair_id": "r2-000000"}])
    r = rounds.Rounds(rounds.parse_args(real_flags(synthetic_data, out, first, tmp_path, "--labels", str(given))))
    assert r.source.labelled_rows(out / "round2", 2) == [{**pair, **labels, "round": 2, "pair_id": "r2-000000"}]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        r.source.labelled_rows(out / "round3", 3)
    assert stop.value.code == 3
    said = capsys.readouterr().out
    assert f"round 3 waits for labels: label {out / 'round3' / 'collect' / 'pairs.jsonl'}" in said
    assert f"--labels {given} holds the labels of round 2, not round 3's" in said
    # round 3's own file, where the message said: read
    write_jsonl(out / "round3" / "label" / "labelled.jsonl", [{**pair3, **labels, "round": 3, "pair_id": "r3-000000"}])
    assert [row["pair_id"] for row in r.source.labelled_rows(out / "round3", 3)] == ["r3-000000"]


def test_the_summary_without_a_judge_shows_the_arena(tmp_path, synthetic_data):
    # Real data: no round has the judge's evaluation; each met the last in the arena. The table shows those
    # numbers (by hand), not empty judge columns.
    from iterated.report import markdown

    arena = {"reward_win_rate": 0.25, "cost_win_rate": 0.5, "baseline": {"safe_rate": 0.625},
             "candidate": {"safe_rate": 0.875}}
    lines = markdown([{"round": 1, "threshold": 0.0}, {"round": 2, "threshold": -0.5, "arena_vs_last": arena}])
    assert lines.splitlines()[0].startswith("| policy | vs last: reward wins | cost wins | safe (last) | safe (this) |")
    assert lines.splitlines()[3] == "| v2 | 0.250 | 0.500 | 0.625 | 0.875 | -0.500 |  |  |  |  |  |"
    # with the judge: its columns, as before
    judged = markdown([{"round": 1, "eval": {"harmful_rate": 0.125, "harmful_rate_se": 0.0625}, "arena_vs_last": arena}])
    assert judged.splitlines()[0].startswith("| policy | harmful |") and "| v1 | 0.125 ± 0.062 |" in judged


def test_the_threshold_line_says_where_its_costs_come_from(tmp_path, synthetic_data, monkeypatch, capsys):
    # No answer labelled both safe and more helpful: c_safe and c_harm are the score quantiles', and the
    # line must not say they are what the last policy's answers cost.
    first = fake_round_one(tmp_path / "round1", synthetic_data)
    out = tmp_path / "rounds"
    (out / "round2").mkdir(parents=True)
    r = rounds.Rounds(rounds.parse_args(small_flags(synthetic_data, out, first)))
    quantiles = {"threshold": -0.5, "c_safe": -0.75, "c_harm": 0.25}
    for rule, says in (("quantiles", "no labelled answer to read, so the held-out score quantiles: safe answers cost "
                                     "-0.750, unsafe ones 0.25"),
                       ("helpful-safe answers", "the last policy's helpful safe answers cost -0.750, unsafe ones 0.25")):
        monkeypatch.setattr(r, "derive", lambda k, rule=rule: {**quantiles, "rule": rule, "quantile_rule": quantiles})
        (out / "round2" / "threshold.json").unlink(missing_ok=True)
        r.threshold(2)
        line = capsys.readouterr().out
        assert f"threshold: -0.500 on round 2's cost model ({rule}: {says};" in line
        assert json.loads((out / "round2" / "threshold.json").read_text())["threshold"] == -0.5


def test_collect_runs_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    """--device auto (the default): collect generates where the stages train, cuda when torch sees a GPU (a 7B
    policy sampling on the CPU takes hours), else cpu; an explicit device is kept."""
    import torch

    flags = ["--out", str(tmp_path / "r")]
    for gpu, device in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert rounds.parse_args(flags).device == device
        assert rounds.parse_args([*flags, "--device", "cpu"]).device == "cpu"


def test_real_data_round_one_gets_its_sft_data(tmp_path, synthetic_data, monkeypatch, capsys):
    """Without --from, round 1 is pipeline.py run here: real data needs --sft-data (else its SFT would train on the
    embedded task), which pipeline.py is then given with the rest of round 1's data."""
    task = synthetic_data
    flags = ["--out", str(tmp_path / "rounds"), "--prompts", str(task.ppo_prompts), "--preference-data",
             str(task.preference_train), "--eval-prompts", str(task.eval_prompts)]
    with pytest.raises(SystemExit):
        rounds.parse_args(flags)
    assert "real data (--prompts) without --from needs --sft-data" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(rounds, "run_script", lambda script, flags, launcher=None: calls.append((script, list(map(str, flags)))))
    r = rounds.Rounds(rounds.parse_args([*flags, "--sft-data", str(task.sft_train)]))
    r.steps.run = lambda name, product, fn, **kwargs: fn()
    r.round_one()
    (pipeline_flags,) = [flags for script, flags in calls if script == "pipeline.py"]
    given = dict(zip(pipeline_flags[::2], pipeline_flags[1::2]))
    assert {k: given[k] for k in ("--sft-data", "--prompts", "--preference-data", "--eval-prompts")} == {
        "--sft-data": str(task.sft_train), "--prompts": str(task.ppo_prompts),
        "--preference-data": str(task.preference_train), "--eval-prompts": str(task.eval_prompts)}
