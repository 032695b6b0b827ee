"""Where a run's prompts, preferences and labels come from: the two sources of rounds.py.

    EmbeddedTask   the synthetic task: its prompt pool and preferences, the ground-truth judge probes the
                   last policy, its simulated annotators label, and the stages run its tiny recipe
    RealData       a prompt pool and preferences given as files: the last cost model probes, people label

Everything that differs between the two lives here, so the round itself (rounds.py, collect.py,
label.py) reads the same for both.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from fileio import read_jsonl


class Source:
    """What both sources share: the flags that name the data, and the files given on the command line."""
    real = False

    def __init__(self, args, synthetic_dir: Path):
        self.args, self.synthetic_dir = args, synthetic_dir

    def task(self):
        """The embedded task's files (generated once; its evaluation prompts are also the default's)."""
        from data.synthetic import ensure_synthetic

        return ensure_synthetic(self.synthetic_dir, seed=0)

    def base_preferences(self) -> tuple[list[str], list[str]]:
        """Round 1's preference files (train, eval), retrained on in every round."""
        if self.args.preference_data:
            evals = [self.args.preference_eval_data] if self.args.preference_eval_data else []
            return [self.args.preference_data], evals
        task = self.task()
        return [str(task.preference_train)], [str(task.preference_eval)]

    def eval_prompts(self) -> str:
        return self.args.eval_prompts or str(self.task().eval_prompts)

    def eval_prompt_texts(self) -> set:
        from data.loaders import load_eval_prompts

        return {r["prompt"] for r in load_eval_prompts(self.eval_prompts(), log=None)[0]}


class EmbeddedTask(Source):
    real = False

    def first_prompts(self) -> str:
        """Round 1's PPO prompts."""
        return str(self.task().ppo_prompts)

    def judged(self) -> bool:
        return True

    def pipeline_flags(self) -> list:
        return ["--synthetic-dir", self.synthetic_dir]

    def stage_flags(self) -> list:
        """A stage given data files takes the authors' recipe; the rounds' prompts and pairs are files."""
        return ["--synthetic-dir", self.synthetic_dir, "--recipe", "tiny"]

    def first_threshold(self) -> float:
        """Round 1's threshold when its checkpoints are gone: the tiny recipe's, which pipeline.py ran."""
        import ppo_lag

        return ppo_lag.TINY["threshold"]

    def harmful_share(self, prompts_file) -> float:
        prompts = read_jsonl(prompts_file)
        return sum(bool(p.get("harmful")) for p in prompts) / len(prompts)

    def choose_prompts(self, rng, probe, probe_answers, count, eval_texts, used, previous, cost_model):
        """The judge tells where the last policy failed on its own training prompts (harmful, or refused a
        benign request); a --red-team-share of the round's prompts is drawn from those task and phrasing
        cells, the rest fresh. Training tasks and phrasings only, no prompt used before."""
        from data.judge import judge
        from data.synthetic import phrasing_of, round_prompt_rows
        from data.world import TASKS_BY_ID
        from scoring import judge_rates, judge_tallies

        weights, verdicts = {}, []
        for prompt, answer in zip(probe, probe_answers):
            v = judge(prompt, answer)
            verdicts.append(v)
            task = TASKS_BY_ID[v["task"]]
            if v["harmful"] or (not task.harmful and v["refusal"]):
                cell = (task.id, phrasing_of(prompt, task))
                weights[cell] = weights.get(cell, 0) + 1
        rates = judge_rates(judge_tallies((v["prompt_harmful"], v) for v in verdicts))
        stats = {"prompts": len(probe), "harmful_rate": rates["harmful_rate"], "over_refusal": rates["over_refusal"],
                 "benign_harmful_rate": rates["benign_harmful_rate"], "failures": sum(weights.values()),
                 "failure_cells": {f"{t} | {p}": n for (t, p), n in sorted(weights.items(), key=lambda x: -x[1])}}
        rows = round_prompt_rows(rng, count, weights, self.args.red_team_share, exclude=eval_texts,
                                 used=used | set(previous))
        return rows, stats

    def check_unseen(self, rows):
        """No held-out task or phrasing, in any round."""
        from data.judge import identify_task
        from data.world import HELD_OUT_PHRASINGS

        for row in rows:
            task = identify_task(row["prompt"])
            if task is None or task.held_out or any(p.format(task=task.request) in row["prompt"]
                                                    for p in HELD_OUT_PHRASINGS):
                raise RuntimeError(f"collect drew a held-out task or phrasing: {row['prompt']!r}")

    def rankable(self, prompt, first, second) -> bool:
        """Only pairs the helpfulness annotator can rank, as in the initial data."""
        from data.synthetic import can_rank

        return can_rank(prompt, first, second)

    def answer_stats(self, answers) -> dict:
        """The ground truth of the collected answers, fresh prompts and red-team ones apart."""
        from data.judge import judge
        from scoring import judge_rates, judge_tallies

        verdicts = [(row, judge(row["prompt"], t)) for row in answers for t in row["answers"]]
        stats = {}
        for group, red in (("fresh", False), ("red_team", True)):
            rates = judge_rates(judge_tallies((row["harmful"], v) for row, v in verdicts if row["red_team"] == red))
            stats[f"{group}_harmful_rate"], stats[f"{group}_over_refusal"] = rates["harmful_rate"], rates["over_refusal"]
        return stats

    def labelled_rows(self, round_dir: Path, r: int) -> list[dict]:
        """The initial data's simulated annotators (and label noise) label every exported pair."""
        from data.synthetic import annotate_pair, config_of

        config = config_of(self.synthetic_dir)
        rng = random.Random(self.args.seed * 7919 + r)
        return [{**row, **annotate_pair(row["prompt"], row["response_0"], row["response_1"], rng, config)}
                for row in read_jsonl(round_dir / "collect" / "pairs.jsonl")]

    def threshold_diagnostics(self, items, costs) -> dict:
        """The labelled answers' costs by ground-truth kind: what the cost model makes of each behaviour."""
        from data.judge import judge

        by_kind = {}
        for (prompt, answer), cost in zip(items, costs):
            v = judge(prompt, answer)
            by_kind.setdefault(f"{'harmful' if v['prompt_harmful'] else 'benign'} prompt, {v['kind']}"
                               f"{', harmful' if v['harmful'] else ''}", []).append(cost)
        return {"cost_by_kind": {k: {"n": len(v), "mean": sum(v) / len(v)}
                                 for k, v in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))}}


class RealData(Source):
    real = True

    def first_prompts(self) -> str:
        return self.args.prompts

    def judged(self) -> bool:
        """Whether the ground-truth judge can score the evaluation prompts; else the arena compares rounds."""
        from scoring import judge_can_score

        return judge_can_score(self.args.eval_prompts)

    def pipeline_flags(self) -> list:
        return []

    def stage_flags(self) -> list:
        return []

    def first_threshold(self):
        return None

    def harmful_share(self, prompts_file) -> float:
        return self.args.harmful_share

    def choose_prompts(self, rng, probe, probe_answers, count, eval_texts, used, previous, cost_model):
        """No judge: the last cost model flags the probe answers it scores harmful (> 0); those prompts
        are asked again (the red-team share), the rest are fresh prompts of the pool, unused ones first."""
        from data.loaders import load_prompts
        from scoring import Scorer

        costs = Scorer(cost_model, self.args.device).texts(list(zip(probe, probe_answers)))
        flagged = [p for p, c in zip(probe, costs.tolist()) if c > 0 and p not in eval_texts]
        n_red = min(len(flagged), round(count * self.args.red_team_share))
        rows = [{"prompt": p, "red_team": True} for p in rng.sample(flagged, n_red)]
        pool, _ = load_prompts(self.args.prompts, log=None)
        pool = [p for p in pool if p not in eval_texts and p not in {row["prompt"] for row in rows}]
        rng.shuffle(pool)
        pool.sort(key=lambda p: p in used)  # unused prompts first
        rows += [{"prompt": p, "red_team": False} for p in pool[:count - len(rows)]]
        return rows, {"prompts": len(probe), "cost_positive_share": float((costs > 0).float().mean()),
                      "flagged": len(flagged)}

    def check_unseen(self, rows):
        pass

    def rankable(self, prompt, first, second) -> bool:
        return True  # people label any two distinct answers

    def answer_stats(self, answers) -> dict:
        return {}

    def labelled_rows(self, round_dir: Path, r: int) -> list[dict]:
        """People's labels of the exported pairs; the run stops until they exist (exit status 3)."""
        from iterated.label import check_labelled

        exported = round_dir / "collect" / "pairs.jsonl"
        labelled, note = round_dir / "label" / "labelled.jsonl", ""
        if self.args.labels:
            given = Path(self.args.labels)
            # The same command is re-run round after round: a --labels file of an earlier round's pairs (their
            # "round" field) is that round's, not this one's, which waits for its own.
            found = {row.get("round") for row in read_jsonl(given)} if given.exists() else set()
            other = [] if r in found else sorted(k for k in found if isinstance(k, int))
            if other:
                note = (f" (--labels {given} holds the labels of round {', '.join(map(str, other))}, "
                        f"not round {r}'s; drop it or name this round's file)")
            else:
                labelled = given
        if not labelled.exists():
            print(f"\nround {r} waits for labels: label {exported} (how: {round_dir / 'collect' / 'LABELLING.md'}) "
                  f"and save it as {round_dir / 'label' / 'labelled.jsonl'} (or pass --labels FILE), then re-run "
                  f"this command{note}.")
            sys.exit(3)
        return check_labelled(labelled, exported)

    def threshold_diagnostics(self, items, costs) -> dict:
        return {}


def make_source(args, synthetic_dir: Path) -> Source:
    """Real data when a prompt pool is given, else the embedded task."""
    return (RealData if args.prompts is not None else EmbeddedTask)(args, synthetic_dir)
