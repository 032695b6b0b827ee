"""Iterated Safe RLHF: the paper's rounds (Beaver-v1, v2, v3), one command.

    python rounds.py --rounds 3 --out runs/rounds/seed0 --seed 0              # round 1 = pipeline.py
    python rounds.py --rounds 3 --out runs/rounds/seed1 --seed 1 --from runs/seed1   # round 1 = a finished pipeline.py output
    python rounds.py --rounds 3 --out runs/rounds/7b --from runs/7b --prompts pku/prompts.jsonl \
        --preference-data pku/train.jsonl --preference-eval-data pku/test.jsonl --eval-prompts red_team.jsonl \
        --launcher "torchrun --nproc_per_node=8"                               # real data, people label

Round 1 is pipeline.py (SFT, reward model, cost model, PPO-Lagrangian, evaluation), or the finished
output given by --from. Every later round r, in <out>/round<r>:

  collect   the last policy answers a fresh prompt set of this round, --samples-per-prompt answers
            each: training tasks through training and new phrasings (data/synthetic.py ROUND_PHRASINGS),
            plus a --red-team-share aimed at where the last policy failed (harmful, or refused a benign
            request) on its own training prompts (a probe of --probe-prompts of them). Held-out tasks,
            held-out phrasings and the evaluation prompts are never drawn. Writes collect/pairs.jsonl:
            pairs of distinct answers as PKU-SafeRLHF rows with the label fields null.
  label     embedded task: the initial data's simulated annotators and label noise label every pair
            (data.synthetic.annotate_pair). Real data: people label collect/pairs.jsonl into
            label/labelled.jsonl (or --labels FILE); the run stops until it exists, and a row whose
            labels are missing or inconsistent is refused, naming its line. A share (--eval-fraction)
            is held out for the score models' evaluation.
  reward model, cost model
            train_score.py on all preference data so far (the initial data and every round's labels),
            from the SFT model (--score-init sft, the default) or from the last round's (last).
  threshold the cost limit re-derived on the new cost model's scale: its mean cost on this round's
            answers labelled safe that won their pair on helpfulness (the helpful safe behaviour: a
            benign request answered, a harmful one redirected), plus the share of harmful prompts times
            --target-harmful-rate times the gap to the answers labelled unsafe; and never above the
            last policy's own mean cost on this round's prompts (all its collected answers) under the
            new cost model (--threshold-rule no-looser): no round buys helpfulness with expected cost.
            The rule from the score quantiles alone (config.json "score_stats") is written beside it
            in threshold.json.
  ppo_lag   PPO-Lagrangian from the last round's policy on this round's prompts; its KL reference is
            that policy (--reference last, the default: the authors' scripts load the reference from
            the actor's path) or the SFT model (--reference sft); its multiplier starts where
            the last round's ended (--carry-lambda, the default), or at 1 (--no-carry-lambda).
  eval      evaluate.py on the fixed held-out prompts (real data: --eval-prompts; the arena against the
            last policy when the judge cannot score them).

A step whose product exists is skipped; the stage scripts resume an interrupted run from their
checkpoints, and collect and label write their files atomically, so re-running the same command
after a crash or Ctrl-C finishes the rounds. <out>/rounds.json holds one row per round (and SFT),
printed as a table; `python plots.py rounds <out>/rounds.json ...` draws the plane.
"""

import argparse
import itertools
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
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


def run_script(script, flags, launcher=None):
    cmd = [*(launcher or [sys.executable]), str(ROOT / script), *map(str, flags)]
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{script} failed (exit {result.returncode}); fix it and re-run the same rounds.py command to "
                 f"resume:\n  {shlex.join(cmd)}")


def write_jsonl(path, rows):
    """Atomically: a killed collect or label step leaves no half-written product."""
    import hf_io

    hf_io.atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path):
    """The records of a file rounds.py or a stage wrote (the loaders' reader: a damaged line is named)."""
    from data.loaders import read_records

    return [record for _, record in read_records(path)]


def recipe_flags(recipe: dict, skip=()) -> list[str]:
    """A stage's tiny recipe as explicit flags: a stage given data files takes the authors' recipe,
    so the rounds on the embedded task (whose prompts and pairs are files) pass the tiny one."""
    flags = []
    for key, value in recipe.items():
        if key in skip:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


# ---------------------------------------------------------------------------------------------
# the cost threshold on a cost model's scale

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def quantile(stats: dict, q: float) -> float:
    """The score at quantile q, linearly interpolated between the saved q05 ... q95 (clamped)."""
    points = [(p, stats[f"q{int(p * 100):02d}"]) for p in QUANTILES]
    if q <= points[0][0]:
        return points[0][1]
    for (p0, v0), (p1, v1) in zip(points, points[1:]):
        if q <= p1:
            return v0 + (q - p0) / (p1 - p0) * (v1 - v0)
    return points[-1][1]


def derive_threshold(stats: dict, unsafe_share: float, harmful_prompt_share: float, target_harmful_rate: float) -> dict:
    """The cost limit for a harmful-answer rate of `target_harmful_rate` on harmful prompts.

    The held-out answers the quantiles were taken on are a share u unsafe; with a cost model that
    separates them (the sign term puts safe answers below 0 and harmful ones above), the safe ones
    fill the lower 1 - u of the distribution and the harmful ones the top u, so the typical safe cost
    is the quantile (1 - u) / 2 and the typical harmful cost the quantile 1 - u / 2. A policy that
    answers a share h of harmful prompts, and a rate p of those harmfully, has J_C ~ c_safe + h p
    (c_harm - c_safe): that is the threshold. On round 1's scale (seeds 0 and 1: c_safe -2.84 and -2.85,
    c_harm 3.01 and 2.74, h = 0.5, p = 0.01) it gives -2.81 and -2.82: the tiny recipe's -2.8."""
    u = min(max(unsafe_share, 0.01), 0.99)
    c_safe, c_harm = quantile(stats, (1 - u) / 2), quantile(stats, 1 - u / 2)
    return {"threshold": c_safe + harmful_prompt_share * target_harmful_rate * (c_harm - c_safe),
            "c_safe": c_safe, "c_harm": c_harm, "unsafe_share": unsafe_share,
            "harmful_prompt_share": harmful_prompt_share, "target_harmful_rate": target_harmful_rate}


def derive_threshold_on_policy(safe_winner_costs, unsafe_costs, harmful_prompt_share: float,
                               target_harmful_rate: float, fallback_c_harm: float, min_unsafe: int = 20) -> dict:
    """The cost limit on the new cost model's scale, read off this round's labelled answers of the
    last policy: c_safe, the mean cost of the answers labelled safe that won their pair on
    helpfulness (a benign request answered, a harmful one redirected: the most helpful safe
    behaviour), c_harm the mean cost of the answers labelled unsafe that the cost model also scores
    harmful (> 0; the quantile rule's estimate when fewer than `min_unsafe`): with a policy that is
    rarely harmful most answers labelled unsafe are label noise (seed 0, round 2: 401 labelled
    unsafe, 41 harmful), which would put c_harm below 0 instead of about +3. The threshold
    c_safe + h p (c_harm - c_safe) lets a share p of the harmful prompts (h of all) be answered
    harmfully once every other answer is helpful and safe.

    Why these answers: safe answers do not cost the same. The harmlessness annotators prefer the more
    cautious of two safe answers, so a refusal costs about 0.5 less than a redirect or a benign answer
    (seed 0, round 2: refusal -3.12 on harmful and -3.33 on benign prompts, redirect -2.67, benign
    answer -2.71). Measured on seed 0's round 2 of the 9-task world (before 2026-12-01): the quantile
    rule (held-out preference answers, another mix) gave -2.74/-2.76; the mean over every safe answer
    of the last policy (which refused most harmful requests) gave -2.98, and PPO, turning refusals
    into redirects, ran into it at -2.68 with lambda at its cap of 5 from iteration 33. At the
    helpful-safe level refusals leave slack instead, as round 1's -2.8 did."""
    c_safe = sum(safe_winner_costs) / len(safe_winner_costs)
    harmful = [c for c in unsafe_costs if c > 0]
    c_harm = sum(harmful) / len(harmful) if len(harmful) >= min_unsafe else fallback_c_harm
    return {"threshold": c_safe + harmful_prompt_share * target_harmful_rate * (c_harm - c_safe),
            "rule": "helpful-safe answers", "c_safe": c_safe, "c_harm": c_harm,
            "harmful_prompt_share": harmful_prompt_share, "target_harmful_rate": target_harmful_rate,
            "safe_winners": len(safe_winner_costs), "unsafe_answers": len(unsafe_costs), "unsafe_scored_harmful": len(harmful)}


def unsafe_share(files) -> float:
    """Share of the answers labelled unsafe in preference files (consistent rows, as the cost model reads)."""
    from data.loaders import load_preferences

    rows, _ = load_preferences(",".join(map(str, files)), log=None)
    return sum((not r.is_response_0_safe) + (not r.is_response_1_safe) for r in rows) / max(2 * len(rows), 1)


# ---------------------------------------------------------------------------------------------
# labelled files from people

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


# ---------------------------------------------------------------------------------------------
# scoring answers with a reward or cost model (diagnostics of the labelled pairs)

def score_texts(model_path, items, device="cpu", batch_size=64):
    """End scores [N] of (prompt, answer) items under a score model, as train_score.py reads them."""
    import torch

    import hf_io
    from data.loaders import pad_sequences
    from data.tokenizer import Tokenizer, encode_prompt
    from model import end_scores
    from training import resolve_template

    template = resolve_template(None, model_path)
    tok = Tokenizer(model_path).for_template(template)
    model = hf_io.load_pretrained(model_path, device=device).eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            seqs = [encode_prompt(tok, p, template) + tok.encode(a) + [tok.eos_id] for p, a in items[i:i + batch_size]]
            ids, mask = pad_sequences(seqs, tok.pad_id, "right")
            scores.append(end_scores(model(ids.to(device), mask.to(device)), mask.to(device)).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def score_model_diagnostics(reward_model, cost_model, rows, device, threshold=None) -> dict:
    """How last round's reward and cost models read this round's labelled pairs (answers of the
    policy they trained, never seen by them): pair accuracy against the labels, the cost model's sign
    against each answer's safety label and, on the embedded task, against the ground truth."""
    import torch

    if not rows:
        return {}
    answers = [(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)]
    reward = score_texts(reward_model, answers, device).view(-1, 2)
    cost = score_texts(cost_model, answers, device).view(-1, 2)
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


# ---------------------------------------------------------------------------------------------


class Rounds:
    def __init__(self, args):
        self.args = args
        # Absolute paths: the stage scripts refuse to resume a checkpoint whose data paths are spelled
        # differently, so `--out runs/x` and `--out $PWD/runs/x` must give the same flags.
        self.out = Path(args.out).resolve()
        self.first = Path(args.from_dir).resolve() if args.from_dir else self.out / "round1"
        self.real = args.prompts is not None
        if args.synthetic_dir:
            self.synthetic_dir = Path(args.synthetic_dir).resolve()
        elif (self.first / "synthetic" / "manifest.json").exists():
            self.synthetic_dir = self.first / "synthetic"
        else:
            self.synthetic_dir = self.out / "synthetic"
        self.launcher = shlex.split(args.launcher) or None
        self.timings_path = self.out / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    # -- paths ---------------------------------------------------------------------------------
    def dir(self, r) -> Path:
        return self.first if r == 1 else self.out / f"round{r}"

    @property
    def sft(self) -> Path:
        return self.first / "sft" / "model"

    def actor(self, r) -> Path:
        return self.dir(r) / "ppo_lag" / "actor"

    def score_model(self, r, objective) -> Path:
        return self.dir(r) / f"{objective}_model" / "model"

    def eval_json(self, r) -> Path:
        if r == 1 and not (self.first / "eval" / "eval.json").exists():
            return self.out / "round1_eval" / "eval.json"  # --from a pipeline output that has no evaluation
        return self.dir(r) / "eval" / "eval.json"

    def task(self):
        from data.synthetic import ensure_synthetic

        return ensure_synthetic(self.synthetic_dir, seed=0)

    def training_prompts(self, r) -> str:
        """The prompts round r's PPO trained on: its training-side prompts."""
        if r == 1:
            return self.args.prompts or str(self.task().ppo_prompts)
        return str(self.dir(r) / "collect" / "prompts.jsonl")

    def eval_prompt_texts(self) -> set:
        from data.loaders import load_eval_prompts

        spec = self.args.eval_prompts or str(self.task().eval_prompts)
        return {r["prompt"] for r in load_eval_prompts(spec, log=None)[0]}

    def base_preferences(self):
        if self.args.preference_data:
            return [self.args.preference_data], ([self.args.preference_eval_data] if self.args.preference_eval_data else [])
        task = self.task()
        return [str(task.preference_train)], [str(task.preference_eval)]

    # -- bookkeeping -----------------------------------------------------------------------------
    def step(self, name, product, fn):
        if Path(product).exists():
            print(f"== {name}: {product} exists, skipped", flush=True)
            return
        print(f"== {name}", flush=True)
        t0 = time.time()
        fn()
        self.timings[name] = round(time.time() - t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n")

    def check_flags(self):
        """Products made with other settings are kept (a finished step is never redone), but said."""
        keys = ["rounds", "from_dir", "seed", "prompts_per_round", "samples_per_prompt", "pairs_per_prompt",
                "red_team_share", "probe_prompts", "eval_fraction", "score_init", "reference", "target_harmful_rate",
                "threshold_rule", "carry_lambda", "max_new_tokens", "score_args", "ppo_args", "eval_args",
                "pipeline_args", "prompts", "preference_data", "preference_eval_data", "eval_prompts"]
        flags = {k: getattr(self.args, k) for k in keys}
        path = self.out / "rounds_flags.json"
        if path.exists():
            before = json.loads(path.read_text())
            changed = [k for k in keys if k != "rounds" and before.get(k) != flags[k]]
            if changed:
                print("warning: finished steps in " + str(self.out) + " were made with other settings ("
                      + ", ".join(f"{k}: {before.get(k)!r} -> {flags[k]!r}" for k in changed)
                      + "); they are kept and skipped: delete a round's directory to redo it", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(flags, indent=2) + "\n")

    # -- round 1 -------------------------------------------------------------------------------
    def round_one(self):
        a = self.args
        if a.from_dir:
            missing = [p for p in (self.sft, self.score_model(1, "reward"), self.score_model(1, "cost"), self.actor(1))
                       if not (p / "config.json").exists()]
            if missing:
                sys.exit(f"--from {a.from_dir}: not a finished pipeline.py output (missing {', '.join(map(str, missing))}); "
                         "finish it with pipeline.py, or leave --from out to run round 1 here")
            print(f"== round 1: the finished pipeline output {self.first}", flush=True)
        else:
            flags = ["--out", self.first, "--seed", a.seed, *shlex.split(a.pipeline_args)]
            if not self.real:
                flags += ["--synthetic-dir", self.synthetic_dir]
            for flag, value in (("--prompts", a.prompts), ("--preference-data", a.preference_data),
                                ("--preference-eval-data", a.preference_eval_data), ("--eval-prompts", a.eval_prompts)):
                if value:
                    flags += [flag, value]
            if a.launcher:
                flags += ["--launcher", a.launcher]
            self.step("round1 pipeline", self.actor(1) / "config.json",
                      lambda: run_script("pipeline.py", flags))
        if not self.real or self.judged():
            self.step("round1 eval", self.eval_json(1), lambda: self.evaluate(1, with_sft=True))

    def judged(self) -> bool:
        """Whether the ground-truth judge can score the evaluation prompts (the embedded task's own)."""
        from data.judge import identify_task
        from data.loaders import load_eval_prompts

        if not self.args.eval_prompts:
            return True
        rows = load_eval_prompts(self.args.eval_prompts, log=None)[0]
        return all(r["harmful"] is not None and identify_task(r["prompt"]) is not None for r in rows)

    # -- collect -------------------------------------------------------------------------------
    def collect(self, r):
        from data.judge import judge
        from data.loaders import load_prompts
        from data.synthetic import phrasing_of, round_prompt_rows
        from data.world import TASKS_BY_ID
        from data.tokenizer import Tokenizer
        import hf_io
        from evaluate import sample_answers
        from training import resolve_template

        a, out = self.args, self.dir(r) / "collect"
        policy_path = self.actor(r - 1)
        template = resolve_template(None, policy_path)
        tok = Tokenizer(policy_path).for_template(template)
        policy = hf_io.load_pretrained(policy_path, device=a.device).eval()
        rng = random.Random(a.seed * 1_000_003 + r)

        def sample(prompts, seed):
            texts, _, _, truncated = sample_answers(policy, tok, prompts, batch_size=a.batch_size,
                                                    max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0,
                                                    seed=seed, device=a.device, template=template)
            return texts, truncated

        # 1. probe: where did the last policy fail on its own training prompts?
        previous, _ = load_prompts(self.training_prompts(r - 1), log=None)
        probe = rng.sample(previous, min(a.probe_prompts, len(previous)))
        t0 = time.time()
        probe_answers, _ = sample(probe, a.seed * 1000 + r)
        eval_texts = self.eval_prompt_texts()
        used = set()
        for k in range(2, r):
            used |= {row["prompt"] for row in read_jsonl(self.dir(k) / "collect" / "prompts.jsonl")}
        if not self.real:
            used |= set(previous)
            weights, verdicts = {}, []
            for prompt, answer in zip(probe, probe_answers):
                v = judge(prompt, answer)
                verdicts.append(v)
                task = TASKS_BY_ID[v["task"]]
                failed = v["harmful"] or (not task.harmful and v["refusal"])
                if failed:
                    cell = (task.id, phrasing_of(prompt, task))
                    weights[cell] = weights.get(cell, 0) + 1
            harmful = [v for v in verdicts if v["prompt_harmful"]]
            benign = [v for v in verdicts if not v["prompt_harmful"]]
            probe_stats = {"prompts": len(probe), "harmful_rate": sum(v["harmful"] for v in harmful) / max(len(harmful), 1),
                           "over_refusal": sum(v["refusal"] for v in benign) / max(len(benign), 1),
                           "benign_harmful_rate": sum(v["harmful"] for v in benign) / max(len(benign), 1),
                           "failures": sum(weights.values()),
                           "failure_cells": {f"{t} | {p}": n for (t, p), n in sorted(weights.items(), key=lambda x: -x[1])}}
            rows = round_prompt_rows(rng, a.prompts_per_round, weights, a.red_team_share, exclude=eval_texts, used=used)
        else:
            # Real data: no judge. The last cost model flags the probe answers it scores harmful (> 0);
            # those prompts are asked again (the red-team share), the rest are fresh prompts of the pool.
            costs = score_texts(self.score_model(r - 1, "cost"), list(zip(probe, probe_answers)), a.device)
            flagged = [p for p, c in zip(probe, costs.tolist()) if c > 0 and p not in eval_texts]
            n_red = min(len(flagged), round(a.prompts_per_round * a.red_team_share))
            rows = [{"prompt": p, "red_team": True} for p in rng.sample(flagged, n_red)]
            pool, _ = load_prompts(a.prompts, log=None)
            pool = [p for p in pool if p not in eval_texts and p not in {row["prompt"] for row in rows}]
            rng.shuffle(pool)
            pool.sort(key=lambda p: p in used)  # unused prompts first
            rows += [{"prompt": p, "red_team": False} for p in pool[:a.prompts_per_round - len(rows)]]
            probe_stats = {"prompts": len(probe), "cost_positive_share": float((costs > 0).float().mean()),
                           "flagged": len(flagged)}
        self.check_unseen(rows, eval_texts)
        probe_stats["time_s"] = round(time.time() - t0, 1)

        # 2. K answers per prompt from the last policy
        K = a.samples_per_prompt
        texts, truncated = sample([row["prompt"] for row in rows for _ in range(K)], a.seed * 1000 + 500 + r)
        answers = [{**row, "answers": texts[i * K:(i + 1) * K], "truncated": truncated[i * K:(i + 1) * K]}
                   for i, row in enumerate(rows)]
        del policy

        # 3. pairs to label: distinct answers of one prompt; on the embedded task only pairs the
        #    helpfulness annotator can rank (as the initial data's), for people any two.
        pairs = self.make_pairs(answers, rng, r)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "prompts.jsonl", rows)
        write_jsonl(out / "answers.jsonl", answers)
        (out / "LABELLING.md").write_text(LABELLING_README)
        stats = {"round": r, "policy": str(policy_path), "prompts": len(rows),
                 "red_team_prompts": sum(row["red_team"] for row in rows), "samples_per_prompt": K,
                 "pairs": len(pairs), "probe": probe_stats}
        if not self.real:
            verdicts = [(row, judge(row["prompt"], t)) for row in answers for t in row["answers"]]
            for group, keep in (("fresh", lambda row: not row["red_team"]), ("red_team", lambda row: row["red_team"])):
                harmful = [v for row, v in verdicts if keep(row) and row["harmful"]]
                benign = [v for row, v in verdicts if keep(row) and not row["harmful"]]
                stats[f"{group}_harmful_rate"] = sum(v["harmful"] for v in harmful) / max(len(harmful), 1)
                stats[f"{group}_over_refusal"] = sum(v["refusal"] for v in benign) / max(len(benign), 1)
        (out / "collect.json").write_text(json.dumps(stats, indent=2) + "\n")
        write_jsonl(out / "pairs.jsonl", pairs)  # the product: last
        print(f"collect: {len(rows)} prompts ({stats['red_team_prompts']} red-team), {len(rows) * K} answers, "
              f"{len(pairs)} pairs to label; probe of the last policy: "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in probe_stats.items()
                          if k != "failure_cells"), flush=True)

    def check_unseen(self, rows, eval_texts):
        """Held out in every round: no evaluation prompt, and on the embedded task no held-out task
        or phrasing."""
        from data.judge import identify_task
        from data.world import HELD_OUT_PHRASINGS

        seen = [row["prompt"] for row in rows if row["prompt"] in eval_texts]
        if seen:
            raise RuntimeError(f"collect drew {len(seen)} evaluation prompts (e.g. {seen[0]!r})")
        if not self.real:
            for row in rows:
                task = identify_task(row["prompt"])
                if task is None or task.held_out or any(p.format(task=task.request) in row["prompt"]
                                                        for p in HELD_OUT_PHRASINGS):
                    raise RuntimeError(f"collect drew a held-out task or phrasing: {row['prompt']!r}")

    def make_pairs(self, answers, rng, r):
        from data.synthetic import can_rank

        pairs = []
        for row in answers:
            distinct = list(dict.fromkeys(t for t in row["answers"] if t.strip()))
            rng.shuffle(distinct)
            # disjoint pairs first, then the other combinations
            order = [(distinct[i], distinct[i + 1]) for i in range(0, len(distinct) - 1, 2)]
            order += [p for p in itertools.combinations(distinct, 2) if p not in order]
            kept = 0
            for r0, r1 in order:
                if kept == self.args.pairs_per_prompt:
                    break
                if not self.real and not can_rank(row["prompt"], r0, r1):
                    continue
                extra = {("harmful_prompt" if k == "harmful" else k): row[k] for k in ("task", "harmful", "red_team")
                         if k in row}
                pairs.append({"prompt": row["prompt"], "response_0": r0, "response_1": r1,
                              **{f: None for f in LABEL_FIELDS}, "round": r, "pair_id": f"r{r}-{len(pairs):06d}", **extra})
                kept += 1
        return pairs

    # -- label ---------------------------------------------------------------------------------
    def label(self, r):
        from data.loaders import split_train_eval
        from data.synthetic import annotate_pair, config_of

        a, d = self.args, self.dir(r)
        exported = d / "collect" / "pairs.jsonl"
        if self.real:
            labelled = Path(a.labels) if a.labels else d / "label" / "labelled.jsonl"
            if not labelled.exists():
                print(f"\nround {r} waits for labels: label {exported} (how: {d / 'collect' / 'LABELLING.md'}) and "
                      f"save it as {d / 'label' / 'labelled.jsonl'} (or pass --labels FILE), then re-run this command.")
                sys.exit(3)
            rows = check_labelled(labelled, exported)
        else:
            config = config_of(self.synthetic_dir)
            rng = random.Random(a.seed * 7919 + r)
            rows = [{**row, **annotate_pair(row["prompt"], row["response_0"], row["response_1"], rng, config)}
                    for row in read_jsonl(exported)]
        train, held_out = split_train_eval(rows, a.eval_fraction, seed=a.seed + r)
        out = d / "label"
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "preferences.jsonl", rows)
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "eval.jsonl", held_out)
        stats = {"round": r, "pairs": len(rows), "train": len(train), "eval": len(held_out),
                 "unsafe_answer_share": sum((not x["is_response_0_safe"]) + (not x["is_response_1_safe"]) for x in rows)
                 / max(2 * len(rows), 1),
                 "better_is_less_safe": sum(x["better_response_id"] != x["safer_response_id"] for x in rows) / max(len(rows), 1)}
        threshold = self.threshold_of(r - 1)
        # last round's score models on this round's answers (their own policy's, unseen by them)
        stats["last_models_on_new_answers"] = score_model_diagnostics(
            self.score_model(r - 1, "reward"), self.score_model(r - 1, "cost"), rows, a.device,
            threshold=threshold)
        (out / "label.json").write_text(json.dumps(stats, indent=2) + "\n")
        print(f"label: {len(rows)} pairs ({len(train)} train, {len(held_out)} eval); last round's models on these "
              "answers: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in stats["last_models_on_new_answers"].items()), flush=True)

    # -- score models ----------------------------------------------------------------------------
    def preference_files(self, r, which):
        base_train, base_eval = self.base_preferences()
        files = list(base_train if which == "train" else base_eval)
        for k in range(2, r + 1):
            f = self.dir(k) / "label" / f"{which}.jsonl"
            if f.stat().st_size > 0:
                files.append(str(f))
        return files

    def train_score_models(self, r):
        import train_score

        a = self.args
        jobs = []
        for objective in ("reward", "cost"):
            product = self.score_model(r, objective)
            init = self.sft if a.score_init == "sft" else self.score_model(r - 1, objective)
            flags = ["--objective", objective, "--model", init, "--out", product.parent, "--seed", a.seed,
                     "--data", ",".join(self.preference_files(r, "train")), *self.template_flags()]
            evals = self.preference_files(r, "eval")
            if evals:
                flags += ["--eval-data", ",".join(evals)]
            if not self.real:
                flags += ["--synthetic-dir", self.synthetic_dir, *recipe_flags(train_score.TINY)]
            flags += shlex.split(a.score_args)
            jobs.append((f"round{r} {objective} model", product / "config.json", flags))
        if a.jobs > 1:  # both at once, each its own process
            todo = [(name, flags) for name, product, flags in jobs if not product.exists()]
            for name, product, _ in jobs:
                if product.exists():
                    print(f"== {name}: {product} exists, skipped", flush=True)
            if todo:
                t0 = time.time()
                print("== " + " and ".join(name for name, _ in todo) + " (in parallel)", flush=True)
                procs = [subprocess.Popen([*(self.launcher or [sys.executable]), str(ROOT / "train_score.py"),
                                           *map(str, flags)], cwd=ROOT) for _, flags in todo]
                codes = [p.wait() for p in procs]
                if any(codes):
                    sys.exit(f"train_score.py failed (exit codes {codes}); re-run the same command to resume")
                for name, _ in todo:
                    self.timings[name] = round(time.time() - t0, 1)
                self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n")
            return
        for name, product, flags in jobs:
            self.step(name, product, lambda flags=flags: run_script("train_score.py", flags, self.launcher))

    # -- threshold -------------------------------------------------------------------------------
    def threshold_of(self, r):
        """The threshold round r's PPO used (round 1: pipeline.py's, read from its checkpoint flags)."""
        path = self.dir(r) / "threshold.json"
        if path.exists():
            return json.loads(path.read_text())["threshold"]
        state = sorted((self.dir(r) / "ppo_lag" / "checkpoints").glob("*/state.json"))
        for s in reversed(state):
            try:
                return float(json.loads(s.read_text())["args"]["threshold"])
            except (KeyError, ValueError, TypeError):
                continue
        if r == 1 and not self.real:
            import ppo_lag

            return ppo_lag.TINY["threshold"]
        return None

    def derive(self, r) -> dict:
        """Round r's threshold on its cost model's scale: from the costs of the last policy's answers
        collected this round (derive_threshold_on_policy), with the quantile rule (derive_threshold)
        beside it; round 1 (no collected answers): the quantile rule only."""
        a = self.args
        config = json.loads((self.score_model(r, "cost") / "config.json").read_text())
        stats = config.get("score_stats")
        if not stats or "q05" not in stats:
            raise ValueError(f"{self.score_model(r, 'cost')}: no score quantiles in config.json (train_score.py writes them)")
        if self.real:
            h = a.harmful_share
        else:
            prompts = read_jsonl(self.training_prompts(r)) if r > 1 else read_jsonl(self.task().ppo_prompts)
            h = sum(bool(p.get("harmful")) for p in prompts) / len(prompts)
        files = self.preference_files(r, "eval") if r > 1 else self.base_preferences()[1]
        u = unsafe_share(files) if files else 1 / 3
        by_quantiles = derive_threshold(stats, u, h, a.target_harmful_rate)
        if r == 1:
            return {**by_quantiles, "rule": "quantiles", "score_stats": stats}
        rows = read_jsonl(self.dir(r) / "label" / "preferences.jsonl")
        winners = [(x["prompt"], x[f"response_{x['better_response_id']}"]) for x in rows
                   if x[f"is_response_{x['better_response_id']}_safe"]]
        unsafe = [(x["prompt"], x[f"response_{i}"]) for x in rows for i in (0, 1) if not x[f"is_response_{i}_safe"]]
        # every answer the last policy gave this round's prompts (PPO's prompts): its J_C on the new scale
        answered = [(row["prompt"], t) for row in read_jsonl(self.dir(r) / "collect" / "answers.jsonl")
                    for t in row["answers"]]
        costs = score_texts(self.score_model(r, "cost"), winners + unsafe + answered, a.device).tolist()
        labelled_costs, answered_costs = costs[:len(winners) + len(unsafe)], costs[len(winners) + len(unsafe):]
        if winners:
            result = derive_threshold_on_policy(labelled_costs[:len(winners)], labelled_costs[len(winners):], h,
                                                a.target_harmful_rate, by_quantiles["c_harm"])
        else:
            print(f"warning: no answer of round {r} is labelled both safe and more helpful; the threshold falls back "
                  "to the quantile rule", flush=True)
            result = {**by_quantiles, "rule": "quantiles"}
        result["uncapped_threshold"] = result["threshold"]
        if answered_costs:
            last_cost = result["last_policy_cost"] = sum(answered_costs) / len(answered_costs)
            if a.threshold_rule == "no-looser" and last_cost < result["threshold"]:
                result["threshold"] = last_cost
                result["rule"] += ", capped at the last policy's cost"
        if not self.real:  # the labelled answers by ground-truth kind, to see what the cost model makes of them
            from data.judge import judge

            by_kind = {}
            for (prompt, answer), cost in zip(winners + unsafe, labelled_costs):
                v = judge(prompt, answer)
                by_kind.setdefault(f"{'harmful' if v['prompt_harmful'] else 'benign'} prompt, {v['kind']}"
                                   f"{', harmful' if v['harmful'] else ''}", []).append(cost)
            result["cost_by_kind"] = {k: {"n": len(v), "mean": sum(v) / len(v)} for k, v in
                                      sorted(by_kind.items(), key=lambda kv: -len(kv[1]))}
        return {**result, "quantile_rule": by_quantiles, "score_stats": stats}

    def threshold(self, r):
        result = self.derive(r)
        result["previous"] = self.threshold_of(r - 1)
        (self.dir(r) / "threshold.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"threshold: {result['threshold']:.3f} on round {r}'s cost model ({result['rule']}: the last policy's "
              f"helpful safe answers cost {result['c_safe']:.3f}, its unsafe ones {result['c_harm']:.2f}; the quantile "
              f"rule would give {result['quantile_rule']['threshold']:.3f}; the last policy's own cost on this round's "
              f"prompts: {result.get('last_policy_cost', float('nan')):.3f}); round {r - 1} used {result['previous']}",
              flush=True)

    def template_flags(self) -> list:
        """--template of every later stage: the one round 1's SFT model was trained with (pipeline.py
        --template), left out when it is the stages' default so the recorded flags of earlier runs still match."""
        from training import resolve_template

        template = resolve_template(None, self.sft)
        return [] if template == "safe_rlhf" else ["--template", template]

    # -- PPO-Lagrangian --------------------------------------------------------------------------
    def ppo(self, r):
        import ppo_lag

        a = self.args
        threshold = json.loads((self.dir(r) / "threshold.json").read_text())["threshold"]
        flags = ["--algo", "ppo_lag", "--actor", self.actor(r - 1), "--reward-model", self.score_model(r, "reward"),
                 "--cost-model", self.score_model(r, "cost"), "--prompts", self.training_prompts(r),
                 "--threshold", f"{threshold:.4f}", "--out", self.actor(r).parent, "--seed", a.seed,
                 *self.template_flags()]
        if a.reference == "sft":
            flags += ["--reference", self.sft]
        carried = self.final_lambda(r - 1) if a.carry_lambda else None
        if carried is not None:
            flags += ["--lambda-init", f"{carried:.6g}"]
        if not self.real:
            flags += ["--synthetic-dir", self.synthetic_dir, *recipe_flags(ppo_lag.TINY, skip=("threshold",))]
        flags += shlex.split(a.ppo_args)
        run_script("ppo_lag.py", flags, self.launcher)

    def final_lambda(self, r) -> float | None:
        """Where round r's multiplier ended (its PPO log's last line). Round r + 1's policy starts where
        round r's ended, at the constraint's boundary, so the multiplier starts at that boundary's price
        too: from 1 instead, it lags while the reward pulls the cost above the new limit, and the round
        ends over it (measured in bench/RESULTS.md)."""
        log = self.dir(r) / "ppo_lag" / "log.jsonl"
        lambdas = [row["lambda"] for row in read_jsonl(log) if row.get("lambda") is not None] if log.exists() else []
        if not lambdas:
            print(f"warning: {log}: no lambda logged by round {r}'s PPO-Lagrangian; round {r + 1}'s multiplier "
                  "starts at ppo_lag.py's --lambda-init instead", flush=True)
            return None
        return lambdas[-1]

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, r, with_sft=False):
        a = self.args
        models = ([self.sft] if with_sft else []) + [self.actor(r)]
        flags = ["--reward-model", self.score_model(r, "reward"), "--cost-model", self.score_model(r, "cost"),
                 "--show", "0", "--synthetic-dir", self.synthetic_dir]
        if a.eval_prompts:
            flags += ["--prompts", a.eval_prompts]
        flags += shlex.split(a.eval_args)
        if self.real and not self.judged():
            run_script("evaluate.py", ["--arena", self.actor(r - 1), self.actor(r), "--out", self.dir(r) / "arena", *flags])
            return
        run_script("evaluate.py", ["--models", *models, "--out", self.eval_json(r).parent, *flags])

    # -- the table -------------------------------------------------------------------------------
    def summary(self, n_rounds):
        from plots import policy_name, round_name

        rows = []
        for r in range(1, n_rounds + 1):
            d = self.dir(r)
            row = {"round": r, "policy": str(self.actor(r))}
            if self.eval_json(r).exists():
                results = json.loads(self.eval_json(r).read_text())["results"]
                by_name = {policy_name(k): v for k, v in results.items()}
                row["eval"] = results.get(str(self.actor(r))) or by_name.get("ppo_lag") or list(results.values())[-1]
                if r == 1 and "sft" in by_name:
                    rows.append({"round": 0, "policy": str(self.sft), "eval": by_name["sft"]})
            arena = d / "arena" / "arena.json"
            if arena.exists():
                row["arena_vs_last"] = json.loads(arena.read_text())
            row["threshold"] = self.threshold_of(r)
            if (d / "threshold.json").exists():
                row["threshold_derivation"] = {k: v for k, v in json.loads((d / "threshold.json").read_text()).items()
                                               if k != "score_stats"}
            elif r == 1 and (self.score_model(1, "cost") / "config.json").exists():
                try:
                    row["threshold_derivation"] = {k: v for k, v in self.derive(1).items() if k != "score_stats"}
                except (ValueError, KeyError):
                    pass
            log = d / "ppo_lag" / "log.jsonl"
            if log.exists():
                lines = read_jsonl(log)
                tail = lines[-8:]
                row["ppo"] = {"iterations": len(lines), "final_lambda": lines[-1].get("lambda"),
                              "kl_last8": sum(x["kl"] for x in tail) / len(tail),
                              "cost_last8": sum(x["cost"] for x in tail) / len(tail),
                              "reward_last8": sum(x["reward"] for x in tail) / len(tail)}
            for objective in ("reward", "cost"):
                ev = d / f"{objective}_model" / "eval.json"
                if ev.exists():
                    row[f"{objective}_model_eval"] = json.loads(ev.read_text())
            for name in ("collect", "label"):
                f = d / name / f"{name}.json"
                if f.exists():
                    row[name] = json.loads(f.read_text())
            row["time_s"] = {k.split(" ", 1)[1]: v for k, v in self.timings.items() if k.startswith(f"round{r} ")}
            rows.append(row)
        result = {"out": str(self.out), "seed": self.args.seed, "rounds": rows, "timings": self.timings}
        (self.out / "rounds.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n== rounds (held-out prompts, ground-truth judge) -> {self.out / 'rounds.json'}")
        print(markdown(rows))
        from evaluate import harm_by_task_line

        print("harmful answers by task (* held out of every round):")
        for row in rows:
            if "harmful_by_task" in row.get("eval", {}):
                print(f"  {round_name(row['round'])}: {harm_by_task_line(row['eval'])}")
        return result


def markdown(rows) -> str:
    """One line per policy: SFT, then v1, v2, ... (held-out metrics; the round's threshold, lambda and
    KL at the end of its PPO; the pairs labelled; how last round's cost model read this round's
    answers of its own policy, against the ground truth)."""
    from plots import round_name

    cols = [("harmful_rate", "harmful"), ("harmful_rate_phrasing", "harmful (phrasing)"),
            ("harmful_rate_task", "harmful (task)"), ("helpfulness", "helpful"), ("over_refusal", "over-refusal"),
            ("response_tokens", "tokens")]
    lines = ["| policy | " + " | ".join(t for _, t in cols)
             + " | threshold | λ end | KL | new pairs | last CM sign acc | last CM harmful recall |",
             "| --- |" + " --- |" * (len(cols) + 6)]

    def fmt(value, digits=3):
        return "" if value is None else f"{value:.{digits}f}"

    for row in rows:
        m = row.get("eval", {})
        ppo = row.get("ppo", {})
        diag = row.get("label", {}).get("last_models_on_new_answers", {})
        cells = [fmt(m.get(k)) for k, _ in cols]
        if m.get("harmful_rate_se") is not None:  # sampling noise: a round "no worse" within it is a tie
            cells[0] += f" ± {m['harmful_rate_se']:.3f}"
        cells += [fmt(row.get("threshold")), fmt(ppo.get("final_lambda"), 2), fmt(ppo.get("kl_last8"), 2),
                  str(row.get("label", {}).get("pairs", "")), fmt(diag.get("cost_sign_accuracy_vs_truth")),
                  fmt(diag.get("harmful_recall"))]
        lines.append(f"| {round_name(row['round'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--rounds", type=int, default=3, help="rounds in all, round 1 included (the paper: 3, Beaver-v1 to v3)")
    a("--out", default="runs/rounds", help="root of every round's output: <out>/round<r>/...")
    a("--from", dest="from_dir", default=None, help="a finished pipeline.py output to use as round 1 (not modified)")
    a("--seed", type=int, default=0, help="training seed of every stage and the rounds' sampling")
    a("--synthetic-dir", default=None, help="the embedded task (default: <from>/synthetic if it exists, else <out>/synthetic)")
    a("--pipeline-args", default="", help="extra flags for pipeline.py (round 1)")
    a("--score-args", default="", help="extra flags for train_score.py in rounds 2+")
    a("--ppo-args", default="", help="extra flags for ppo_lag.py in rounds 2+")
    a("--eval-args", default="", help="extra flags for evaluate.py")
    a("--launcher", default="", help='prefix for the training stages, e.g. "torchrun --nproc_per_node=8"')
    a("--jobs", type=int, default=1, choices=[1, 2], help="2: train the reward and cost models of a round at once")
    a("--device", default="cpu", help="device of collect (generation) and the label diagnostics")
    g = parser.add_argument_group("collect and label")
    g.add_argument("--prompts-per-round", type=int, default=2000, help="fresh prompts per round (the size of the PPO prompt set)")
    g.add_argument("--samples-per-prompt", type=int, default=4, help="answers sampled per prompt (K)")
    g.add_argument("--pairs-per-prompt", type=int, default=2, help="pairs of distinct answers labelled per prompt")
    g.add_argument("--red-team-share", type=float, default=0.3,
                   help="share of a round's prompts aimed at the last policy's failures on its training prompts")
    g.add_argument("--probe-prompts", type=int, default=1000, help="training prompts of the last round the probe samples")
    g.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit when collecting")
    g.add_argument("--batch-size", type=int, default=64, help="prompts per generate() call")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="share of each round's pairs held out for the score models' evaluation")
    g = parser.add_argument_group("score models and threshold")
    g.add_argument("--score-init", choices=["sft", "last"], default="sft",
                   help="start each round's reward and cost models from the SFT model or from the last round's")
    g.add_argument("--reference", choices=["last", "sft"], default="last",
                   help="KL reference of each round's PPO: the policy it starts from (the authors' scripts) or the SFT model")
    g.add_argument("--target-harmful-rate", type=float, default=0.01,
                   help="the threshold allows this harmful-answer rate on the training prompts' harmful ones (round "
                        "1's -2.8: about 0.02; held-out prompts came out 1.5-2x more harmful than training ones)")
    g.add_argument("--threshold-rule", choices=["no-looser", "helpful-safe"], default="no-looser",
                   help="helpful-safe: the helpful safe answers' cost plus the --target-harmful-rate allowance; "
                        "no-looser: that, but never above the last policy's own mean cost on this round's prompts "
                        "under the new cost model (no round may buy helpfulness with expected cost)")
    g.add_argument("--carry-lambda", action=argparse.BooleanOptionalAction, default=True,
                   help="start each round's Lagrange multiplier where the last round's ended (--no-carry-lambda: at 1); "
                        "a policy that needed a high multiplier to meet its limit keeps needing it (bench/RESULTS.md)")
    g.add_argument("--harmful-share", type=float, default=0.5, help="real data: share of harmful prompts assumed in the threshold")
    g = parser.add_argument_group("real data (people label)")
    g.add_argument("--prompts", default=None, help="the prompt pool of the rounds (real data; the embedded task's otherwise)")
    g.add_argument("--preference-data", default=None, help="round 1's preference data (default: the embedded task's)")
    g.add_argument("--preference-eval-data", default=None, help="round 1's held-out preference data")
    g.add_argument("--eval-prompts", default=None, help="fixed evaluation prompts (default: the embedded task's held-out ones)")
    g.add_argument("--labels", default=None, help="the labelled pairs of the round waiting for labels (default: <round>/label/labelled.jsonl)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 0 <= args.red_team_share <= 1 or not 0 <= args.eval_fraction < 1:
        parser.error("--red-team-share must be in [0, 1] and --eval-fraction in [0, 1)")
    if args.prompts and not args.eval_prompts:
        parser.error("real data (--prompts) needs --eval-prompts: the fixed prompts every round is evaluated on")
    if args.prompts and not (args.preference_data or args.from_dir):
        parser.error("real data (--prompts) needs --preference-data (round 1's preferences, retrained on in every round)")
    return args


def main(argv=None):
    args = parse_args(argv)
    rounds = Rounds(args)
    rounds.check_flags()
    t_start = time.time()
    rounds.round_one()
    for r in range(2, args.rounds + 1):
        d = rounds.dir(r)
        print(f"\n######## round {r}: from {rounds.actor(r - 1)}", flush=True)
        rounds.step(f"round{r} collect", d / "collect" / "pairs.jsonl", lambda: rounds.collect(r))
        rounds.step(f"round{r} label", d / "label" / "label.json", lambda: rounds.label(r))
        rounds.train_score_models(r)
        rounds.step(f"round{r} threshold", d / "threshold.json", lambda: rounds.threshold(r))
        rounds.step(f"round{r} ppo_lag", rounds.actor(r) / "config.json", lambda: rounds.ppo(r))
        product = d / "arena" / "arena.json" if rounds.real and not rounds.judged() else rounds.eval_json(r)
        rounds.step(f"round{r} eval", product, lambda: rounds.evaluate(r))
    result = rounds.summary(args.rounds)
    print(f"time this invocation: {(time.time() - t_start) / 60:.1f} min; steps run so far: "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in rounds.timings.items()))
    return result


if __name__ == "__main__":
    import cli

    cli.run(main)  # an expected user error prints one line, as in the stage scripts
