"""One overall preference per pair: the single-preference arm of the decoupling ablation.

The paper's premise is that helpfulness and harmlessness are better collected apart: annotators asked
for one judgement "all things considered" get confused when the two conflict. Here the same pairs the
decoupled annotators labelled (data/synthetic.py: the same prompts and answers, the same generator and
seed) get one label each, "which answer is better overall", from one of these annotators:

    consistent     a fixed rule: an unsafe answer loses to a safe one; otherwise the more helpful one wins
                   (the initial data's pairs are never tied in helpfulness). The strongest fair version
                   of the single-preference baseline.
    crowd-S        each label from a different annotator who trades help against harm with a weight w of
                   their own: answer i is worth helpfulness_i - w * harmful_i (the judge's helpfulness in
                   [0, 1]; harmful_i 0 or 1), the worthier one wins. w is log-normal with median 1 (harm
                   weighs as much as a fully helpful answer) and spread S: ln w ~ Normal(0, S^2). A
                   harmful answer more helpful by d than a safe one wins when w < d, with probability
                   Phi(ln d / S); a wider crowd disagrees more.

Both then flip the label at the decoupled annotators' label-noise rate, as those flip theirs. The modes
and spreads are chosen before any run, and fixed: consistent, crowd-0.5, crowd-1, crowd-2.

A mixed file is a PKU-SafeRLHF-single-dimension row per pair ({prompt, response_0, response_1,
better_response_id}), which train_score.py --objective reward reads; with budget "labels" the arm gets
four times the pairs (from the same generator, a separate stream), as many labels as the decoupled data
carries (two safety labels and two preferences per pair).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from .judge import judge

MODES = ("consistent", "crowd-0.5", "crowd-1", "crowd-2")
BUDGETS = ("pairs", "labels")  # equal pairs with the decoupled data, or equal labels (4 per decoupled pair)
LABELS_PER_DECOUPLED_PAIR = 4


def spread_of(mode: str) -> float | None:
    """The crowd's spread S of a mode ("crowd-1" -> 1.0); None for the consistent rule."""
    if mode == "consistent":
        return None
    if not mode.startswith("crowd-"):
        raise ValueError(f"unknown mixed annotator {mode!r}: choose consistent or crowd-S (e.g. crowd-1)")
    spread = float(mode.removeprefix("crowd-"))
    if not spread > 0:
        raise ValueError(f"{mode}: the crowd's spread must be above 0")
    return spread


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def p_first_is_better(verdicts, mode: str) -> float:
    """P(the annotator prefers answer 0 over answer 1), before label noise. verdicts: judge() of each."""
    h0, h1 = verdicts[0]["helpfulness"], verdicts[1]["helpfulness"]
    harm0, harm1 = bool(verdicts[0]["harmful"]), bool(verdicts[1]["harmful"])
    more_helpful = 1.0 if h0 > h1 else 0.0 if h0 < h1 else 0.5
    if harm0 == harm1:
        return more_helpful
    spread = spread_of(mode)
    if spread is None:
        return 0.0 if harm0 else 1.0
    # one answer harmful: it wins when it is more helpful by d and the annotator's w < d
    d = (h0 - h1) if harm0 else (h1 - h0)
    p_harmful_wins = _normal_cdf(math.log(d) / spread) if d > 0 else 0.0
    return p_harmful_wins if harm0 else 1.0 - p_harmful_wins


def p_label_is_0(verdicts, mode: str, noise: float) -> float:
    """P(the label says answer 0), label noise included."""
    p = p_first_is_better(verdicts, mode)
    return p * (1 - noise) + (1 - p) * noise


def mixed_row(row: dict, mode: str, noise: float, rng: random.Random) -> dict:
    """A decoupled preference row -> its single-preference row (the same prompt and answers)."""
    verdicts = [judge(row["prompt"], row["response_0"]), judge(row["prompt"], row["response_1"])]
    label = 0 if rng.random() < p_label_is_0(verdicts, mode, noise) else 1
    return {"prompt": row["prompt"], "response_0": row["response_0"], "response_1": row["response_1"],
            "better_response_id": label, "task": row.get("task"), "harmful_prompt": row.get("harmful_prompt")}


def write_mixed(task_dir, mode: str, budget: str = "pairs", seed: int = 0) -> tuple[Path, Path]:
    """<task_dir>/mixed/<mode>_<budget>_{train,eval}.jsonl for the embedded task in task_dir, written once
    (atomically) and reused; returns (train, eval). The eval file labels the decoupled eval pairs."""
    from fileio import read_jsonl, write_jsonl

    from .synthetic import FILES, config_of, extra_preference_rows

    spread_of(mode)
    if budget not in BUDGETS:
        raise ValueError(f"unknown label budget {budget!r}: choose {' or '.join(BUDGETS)}")
    task_dir = Path(task_dir)
    out = task_dir / "mixed"
    train_path, eval_path = out / f"{mode}_{budget}_train.jsonl", out / f"{mode}_{budget}_eval.jsonl"
    if train_path.exists() and eval_path.exists():
        return train_path, eval_path
    config = config_of(task_dir)
    manifest_seed = json.loads((task_dir / FILES["manifest"]).read_text())["seed"]
    train = read_jsonl(task_dir / FILES["preference_train"])
    if budget == "labels":  # three more pairs per pair, drawn as the decoupled ones were, none repeated
        train = train + extra_preference_rows(task_dir, (LABELS_PER_DECOUPLED_PAIR - 1) * len(train))
    # one stream per mode and file, so that the labels of one mode do not depend on another's
    labels = {name: random.Random(f"mixed:{mode}:{name}:{manifest_seed}:{seed}") for name in ("train", "eval")}
    write_jsonl(eval_path, [mixed_row(r, mode, config.label_noise, labels["eval"])
                            for r in read_jsonl(task_dir / FILES["preference_eval"])])
    write_jsonl(train_path, [mixed_row(r, mode, config.label_noise, labels["train"]) for r in train])
    return train_path, eval_path
