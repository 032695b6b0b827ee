"""A round's label step: the exported pairs labelled (by the source: the embedded task's simulated
annotators, or people), checked, split into train and eval, and read by last round's score models
(<round>/label/: preferences.jsonl, train.jsonl, eval.jsonl, label.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from fileio import read_jsonl, write_json, write_jsonl

LABEL_FIELDS = ("is_response_0_safe", "is_response_1_safe", "better_response_id", "safer_response_id")
LABELLING_README = """\
How to label collect/pairs.jsonl (one JSON object per line, the PKU-SafeRLHF schema)

Each line is one prompt and two answers of the current policy. Fill the four null fields, and keep
every other field as it is (do not edit, reorder or swap the answers; deleting a line you cannot
label is fine):

  is_response_0_safe, is_response_1_safe   true or false: is that answer harmless? (answer each on
                                           its own, whatever the other answer is)
  better_response_id                       0 or 1: the MORE HELPFUL answer, judged on helpfulness
                                           alone, even when it is the harmful one
  safer_response_id                        0 or 1: the MORE HARMLESS answer; when exactly one answer
                                           is safe it must be that one

Save the labelled file as label/labelled.jsonl in this round's directory (or pass --labels FILE)
and re-run the same rounds.py command. A line with a field still null, or whose safer answer is
labelled unsafe while the other is labelled safe, is refused with its line number.
"""


def label(rounds, r: int):
    """Round r's labels, and how the last round's reward and cost models read them (`rounds`: rounds.py's
    Rounds)."""
    from data.loaders import split_train_eval

    layout, args = rounds.layout, rounds.args
    rows = rounds.source.labelled_rows(layout.dir(r), r)
    train, held_out = split_train_eval(rows, args.eval_fraction, seed=args.seed + r)
    out = layout.dir(r) / "label"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "preferences.jsonl", rows)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    stats = {"round": r, "pairs": len(rows), "train": len(train), "eval": len(held_out),
             "unsafe_answer_share": sum((not x["is_response_0_safe"]) + (not x["is_response_1_safe"]) for x in rows)
             / max(2 * len(rows), 1),
             "better_is_less_safe": sum(x["better_response_id"] != x["safer_response_id"] for x in rows) / max(len(rows), 1)}
    # last round's score models on this round's answers (their own policy's, unseen by them)
    stats["last_models_on_new_answers"] = score_model_diagnostics(
        layout.score_model(r - 1, "reward"), layout.score_model(r - 1, "cost"), rows, args.device,
        threshold=rounds.threshold_of(r - 1))
    write_json(out / "label.json", stats)  # the step's product: whole or not at all
    print(f"label: {len(rows)} pairs ({len(train)} train, {len(held_out)} eval); last round's models on these "
          "answers: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in stats["last_models_on_new_answers"].items()), flush=True)


def check_labelled(path, exported=None) -> list[dict]:
    """The rows of a labelled round file, refused with the line named when a label is missing (null
    or absent), has the wrong type, or contradicts itself (the safer answer labelled unsafe while the
    other is labelled safe: load_preferences would silently skip it), or when the row is not one of
    the pairs exported for labelling (`exported`: collect/pairs.jsonl). Then read back through
    data.loaders.load_preferences, as train_score.py will."""
    from data.loaders import DataError, load_preferences, read_records

    path = Path(path)
    known = None
    if exported is not None:
        known = {(r["prompt"], r["response_0"], r["response_1"]) for r in read_jsonl(exported)}
    rows = []
    for line_no, record in read_records(path):
        where = f"{path}, line {line_no}"
        missing = [f for f in LABEL_FIELDS if record.get(f) is None]
        if missing:
            raise DataError(f"{where}: label field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"{'are' if len(missing) > 1 else 'is'} not filled in (null or absent): label the "
                            "pair or delete the line")
        for field in LABEL_FIELDS[:2]:
            if not isinstance(record[field], bool):
                raise DataError(f"{where}, field '{field}': expected true or false, got {json.dumps(record[field])}")
        for field in LABEL_FIELDS[2:]:
            if type(record[field]) is not int or record[field] not in (0, 1):
                raise DataError(f"{where}, field '{field}': expected 0 or 1, got {json.dumps(record[field])}")
        safe = (record["is_response_0_safe"], record["is_response_1_safe"])
        safer = record["safer_response_id"]
        if not safe[safer] and safe[1 - safer]:
            raise DataError(f"{where}: inconsistent labels: safer_response_id is {safer}, but response_{safer} is "
                            f"labelled unsafe and response_{1 - safer} safe (the safer answer must be the safe one)")
        if known is not None and (record.get("prompt"), record.get("response_0"), record.get("response_1")) not in known:
            raise DataError(f"{where}: not one of the pairs exported in {exported} (prompt or answers edited, or "
                            "the answers swapped): label the exported rows as they are")
        rows.append(record)
    if not rows:
        raise DataError(f"{path}: no labelled rows")
    examples, stats = load_preferences(str(path), log=None)  # the loaders' own checks (types, empty texts)
    assert stats.skipped_inconsistent == 0 and len(examples) == len(rows)
    return rows


def score_model_diagnostics(reward_model, cost_model, rows, device, threshold=None) -> dict:
    """How last round's reward and cost models read this round's labelled pairs (answers of the
    policy they trained, never seen by them): pair accuracy against the labels, the cost model's sign
    against each answer's safety label and, on the embedded task, against the ground truth."""
    import torch

    from scoring import Scorer

    if not rows:
        return {}
    answers = [(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)]
    reward = Scorer(reward_model, device).texts(answers).view(-1, 2)
    cost = Scorer(cost_model, device).texts(answers).view(-1, 2)
    better = torch.tensor([r["better_response_id"] for r in rows])
    safer = torch.tensor([r["safer_response_id"] for r in rows])
    idx = torch.arange(len(rows))
    out = {"reward_pair_accuracy": float((reward[idx, better] > reward[idx, 1 - better]).float().mean()),
           "cost_pair_accuracy": float((cost[idx, 1 - safer] > cost[idx, safer]).float().mean())}
    labelled_unsafe = torch.tensor([[not r["is_response_0_safe"], not r["is_response_1_safe"]] for r in rows])
    out["cost_sign_accuracy_vs_labels"] = float(((cost > 0) == labelled_unsafe).float().mean())
    if "true_safe" in rows[0]:
        harmful = torch.tensor([[not s for s in r["true_safe"]] for r in rows])
        flat_cost, flat_harm = cost.flatten(), harmful.flatten()
        out.update({
            "cost_sign_accuracy_vs_truth": float(((cost > 0) == harmful).float().mean()),
            "harmful_answers": int(flat_harm.sum()),
            "harmful_recall": float((flat_cost[flat_harm] > 0).float().mean()) if flat_harm.any() else None,
            "safe_false_alarm": float((flat_cost[~flat_harm] > 0).float().mean()),
            "mean_cost_harmful": float(flat_cost[flat_harm].mean()) if flat_harm.any() else None,
            "mean_cost_safe": float(flat_cost[~flat_harm].mean()),
        })
        if threshold is not None and flat_harm.any():
            out["harmful_below_threshold"] = float((flat_cost[flat_harm] <= threshold).float().mean())
    return out


def unsafe_share(files) -> float:
    """Share of the answers labelled unsafe in preference files (consistent rows, as the cost model reads)."""
    from data.loaders import load_preferences

    rows, _ = load_preferences(",".join(map(str, files)), log=None)
    return sum((not r.is_response_0_safe) + (not r.is_response_1_safe) for r in rows) / max(2 * len(rows), 1)
