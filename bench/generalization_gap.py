"""Where the harm and over-refusal left after the rounds sit: on what the training saw, or on what it
never saw (embedded task, ground-truth judge).

    python bench/generalization_gap.py runs/rounds/seed0 runs/rounds/seed1 runs/rounds/seed2

For every policy of each rounds.py output (SFT, v1, v2, ...) it samples answers, as evaluate.py does
(temperature 1, 4 per prompt), on three prompt sets and prints the harmful rate (harmful prompts) and
the over-refusal (benign prompts) on each:
    training side   --prompts fresh prompts of the training tasks and phrasings that no round drew
                    (half benign, half harmful): what PPO, the probe and the score models can see
    held-out phrasing   the evaluation prompts of trained tasks in phrasings never trained on
    held-out task       the evaluation prompts of tasks never in preference data or PPO prompts
then the mean over the outputs given. A goal met on the training side and missed on a held-out set
is a generalisation limit: no training-side signal (cost model, threshold, probe) can see it. It
also prints each round's labels of the last policy's answers: how many the annotators labelled
unsafe against how many are harmful, and the share of the harmful ones the last round's cost
model scored above 0 (its recall on its own policy's answers).
"""

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.loaders import load_eval_prompts  # noqa: E402
from data.synthetic import ensure_synthetic, round_prompt_rows  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from evaluate import sample_answers, synthetic_metrics  # noqa: E402
from fileio import read_jsonl  # noqa: E402
import hf_io  # noqa: E402
from plots import round_name  # noqa: E402
from training import resolve_template  # noqa: E402

SETS = ("training side", "held-out phrasing", "held-out task")


def used_prompts(out: Path, rounds: list[dict]) -> set:
    """The prompts rounds 2, 3, ... collected and trained on (round 1's are the task's PPO prompts)."""
    used = set()
    for row in rounds:
        collect = out / f"round{row['round']}" / "collect" / "prompts.jsonl"
        if row["round"] > 1 and collect.exists():
            used |= {r["prompt"] for r in read_jsonl(collect)}
    return used


def fresh_training_prompts(out: Path, rounds: list[dict], task, eval_rows, n: int) -> list[dict]:
    """n prompts of the training tasks and phrasings (half harmful) that neither the evaluation nor
    any round's PPO (round 1's prompts, each later round's collected ones) ever used."""
    used = used_prompts(out, rounds) | {r["prompt"] for r in read_jsonl(task.ppo_prompts)}
    rows = round_prompt_rows(random.Random(12345), n, exclude={r["prompt"] for r in eval_rows}, used=used)
    return [r for r in rows if r["prompt"] not in used]  # the pool ran out of unused ones: fewer


def rates(policy_path, prompt_sets, args):
    """The metrics of one policy on each prompt set, with evaluate.py's sampling (temperature 1,
    batches of 64, a generator seeded afresh per set, so each set's answers are evaluate.py's)."""
    template = resolve_template(None, policy_path)
    tok = Tokenizer(policy_path).for_template(template)
    policy = hf_io.load_pretrained(policy_path).eval()
    metrics = []
    for rows in prompt_sets:
        rows = [r for r in rows for _ in range(args.samples_per_prompt)]
        texts, _, lengths, truncated = sample_answers(policy, tok, [r["prompt"] for r in rows], batch_size=64,
                                                      max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                                                      seed=args.seed, device="cpu", template=template)
        metrics.append(synthetic_metrics(rows, texts, lengths, truncated))
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outs", nargs="+", help="rounds.py outputs (each with rounds.json)")
    parser.add_argument("--prompts", type=int, default=512, help="fresh training-side prompts (half harmful)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="answers sampled per prompt (evaluate.py's default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (evaluate.py's default: 0)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (evaluate.py's default)")
    parser.add_argument("--synthetic-dir", default=None,
                        help="the embedded task (default: round 1's <from>/synthetic, else <out>/synthetic)")
    parser.add_argument("--eval-prompts", default=None, help="held-out prompts, FILE or FILE:N (default: the task's)")
    parser.add_argument("--json", default=None, help="also write the rates here: {policy: {set: [[harmful, over-refusal], ...]}}")
    args = parser.parse_args(argv)

    table = {}  # policy name -> set -> (harmful, over-refusal) per output
    for out in map(Path, args.outs):
        if not (out / "rounds.json").exists():
            sys.exit(f"{out}: no rounds.json; give the --out directories of finished rounds.py runs")
        flags = out / "rounds_flags.json"
        if flags.exists() and json.loads(flags.read_text()).get("prompts"):
            sys.exit(f"{out}: a rounds.py run on real prompts; the ground-truth judge knows only the embedded task")
        summary = json.loads((out / "rounds.json").read_text())
        first = next(Path(r["policy"]) for r in summary["rounds"] if r["round"] == 1).parent.parent  # round 1's output
        synthetic = args.synthetic_dir or next((d for d in (first / "synthetic", out / "synthetic")
                                                if (d / "manifest.json").exists()), out / "synthetic")
        task = ensure_synthetic(synthetic, seed=0)
        eval_rows = load_eval_prompts(args.eval_prompts or str(task.eval_prompts), log=None)[0]
        fresh = fresh_training_prompts(out, summary["rounds"], task, eval_rows, args.prompts)
        print(f"\n== {out}: {len(fresh)} fresh training-side prompts, {len(eval_rows)} held-out ones, "
              f"{args.samples_per_prompt} answers each", flush=True)
        for row in summary["rounds"]:
            name = round_name(row["round"])
            training_side, held_out = rates(row["policy"], (fresh, eval_rows), args)
            cells = {"training side": (training_side["harmful_rate"], training_side["over_refusal"]),
                     "held-out phrasing": (held_out["harmful_rate_phrasing"], held_out["over_refusal_phrasing"]),
                     "held-out task": (held_out["harmful_rate_task"], held_out["over_refusal_task"])}
            for key, value in cells.items():
                table.setdefault(name, {}).setdefault(key, []).append(value)
            labels = ""
            label_file = out / f"round{row['round']}" / "label" / "preferences.jsonl"
            if label_file.exists():
                pairs = read_jsonl(label_file)
                labelled_unsafe = sum(not x[f"is_response_{i}_safe"] for x in pairs for i in (0, 1))
                harmful = sum(not s for x in pairs for s in x["true_safe"])
                recall = row.get("label", {}).get("last_models_on_new_answers", {}).get("harmful_recall")
                labels = (f"\n      round {row['round']} labelled v{row['round'] - 1}'s answers: {labelled_unsafe} of "
                          f"{2 * len(pairs)} labelled unsafe, {harmful} harmful"
                          + (f"; round {row['round'] - 1}'s cost model scored {recall:.2f} of those above 0"
                             if recall is not None else ""))
            print(f"  {name}: " + ", ".join(f"{k} {h:.3f}/{o:.3f}" for k, (h, o) in cells.items())
                  + f" (harmful/over-refusal){labels}", flush=True)

    print(f"\n== mean over {len(args.outs)} output(s): harmful rate / over-refusal")
    print("| policy | " + " | ".join(SETS) + " |")
    print("| --- |" + " --- |" * len(SETS))
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(
            "{:.3f} / {:.3f}".format(*(sum(v[i] for v in cells[k]) / len(cells[k]) for i in (0, 1))) for k in SETS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
