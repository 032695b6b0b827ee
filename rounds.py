"""Iterated Safe RLHF: the paper's rounds (Beaver-v1, v2, v3), one command.

    python rounds.py --rounds 3 --out runs/rounds/seed0 --seed 0              # round 1 = pipeline.py
    python rounds.py --rounds 3 --out runs/rounds/seed1 --seed 1 --from runs/seed1   # round 1 = a finished pipeline.py output
    python rounds.py --rounds 3 --out runs/rounds/7b --from runs/7b --prompts pku/prompts.jsonl \\
        --preference-data pku/train.jsonl --preference-eval-data pku/test.jsonl --eval-prompts red_team.jsonl \\
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

This file is the rounds' layout on disk and their step order; the steps live in iterated/ (collect,
label, threshold, report) and what differs between the embedded task and real data in
iterated/sources.py.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import cli
from fileio import read_jsonl, write_json
from iterated import collect, label, report
from iterated.label import unsafe_share
from iterated.sources import make_source
from iterated.threshold import derive_threshold, threshold_for_round
from runner import Steps, run_script
from trackers import REPORT_TO


class Layout:
    """Where every round's products are: round 1 is a pipeline.py output (--from, or <out>/round1),
    round r > 1 is <out>/round<r>, each with pipeline.py's names for its models."""

    def __init__(self, args):
        # Absolute paths: the stage scripts refuse to resume a checkpoint whose data paths are spelled
        # differently, so `--out runs/x` and `--out $PWD/runs/x` must give the same flags.
        self.out = Path(args.out).resolve()
        self.first = Path(args.from_dir).resolve() if args.from_dir else self.out / "round1"
        if args.synthetic_dir:
            self.synthetic_dir = Path(args.synthetic_dir).resolve()
        elif (self.first / "synthetic" / "manifest.json").exists():
            self.synthetic_dir = self.first / "synthetic"
        else:
            self.synthetic_dir = self.out / "synthetic"

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


class Rounds:
    """The steps of every round, in order, over one Layout and one source (iterated/sources.py)."""

    FLAGS = ["rounds", "from_dir", "seed", "prompts_per_round", "samples_per_prompt", "pairs_per_prompt",
             "red_team_share", "probe_prompts", "eval_fraction", "score_init", "reference", "target_harmful_rate",
             "threshold_rule", "carry_lambda", "max_new_tokens", "score_args", "ppo_args", "eval_args",
             "pipeline_args", "prompts", "preference_data", "preference_eval_data", "eval_prompts", "ptx_data",
             "sft_data"]

    def __init__(self, args):
        self.args = args
        self.layout = Layout(args)
        self.source = make_source(args, self.layout.synthetic_dir)
        self.launcher = shlex.split(args.launcher) or None
        self.steps = Steps(self.layout.out / "timings.json")

    def training_prompts(self, r) -> str:
        """The prompts round r's PPO trained on: its training-side prompts."""
        return self.source.first_prompts() if r == 1 else str(self.layout.dir(r) / "collect" / "prompts.jsonl")

    def preference_files(self, r, which) -> list[str]:
        """Every preference file so far (round 1's and each later round's labels), "train" or "eval"."""
        base_train, base_eval = self.source.base_preferences()
        files = list(base_train if which == "train" else base_eval)
        for k in range(2, r + 1):
            f = self.layout.dir(k) / "label" / f"{which}.jsonl"
            if f.stat().st_size > 0:
                files.append(str(f))
        return files

    def check_flags(self):
        """Products made with other settings are kept (a finished step is never redone), but said."""
        flags = {k: getattr(self.args, k) for k in self.FLAGS}
        path = self.layout.out / "rounds_flags.json"
        if path.exists():
            before = json.loads(path.read_text())
            changed = [k for k in self.FLAGS if k != "rounds" and before.get(k) != flags[k]]
            if changed:
                print("warning: finished steps in " + str(self.layout.out) + " were made with other settings ("
                      + ", ".join(f"{k}: {before.get(k)!r} -> {flags[k]!r}" for k in changed)
                      + "); they are kept and skipped: delete a round's directory to redo it", flush=True)
        self.layout.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(flags, indent=2) + "\n")

    def stage_flags(self) -> list:
        """What every later stage run is given besides its own flags: the source's (the embedded task's
        directory and tiny recipe), --template when round 1's SFT model was trained with another than the
        stages' default, and --report-to (each left out when it is the default, so the recorded flags of
        earlier runs still match)."""
        from training import resolve_template

        template = resolve_template(None, self.layout.sft)
        return (self.source.stage_flags() + ([] if template == "safe_rlhf" else ["--template", template])
                + ([] if self.args.report_to == ["none"] else ["--report-to", *self.args.report_to]))

    # -- round 1 -------------------------------------------------------------------------------
    def round_one(self):
        a, layout = self.args, self.layout
        if a.from_dir:
            missing = [p for p in (layout.sft, layout.score_model(1, "reward"), layout.score_model(1, "cost"),
                                   layout.actor(1)) if not (p / "config.json").exists()]
            if missing:
                sys.exit(f"--from {a.from_dir}: not a finished pipeline.py output (missing {', '.join(map(str, missing))}); "
                         "finish it with pipeline.py, or leave --from out to run round 1 here")
            print(f"== round 1: the finished pipeline output {layout.first}", flush=True)
        else:
            flags = ["--out", layout.first, "--seed", a.seed, *shlex.split(a.pipeline_args), *self.source.pipeline_flags()]
            for flag, value in (("--sft-data", a.sft_data), ("--prompts", a.prompts), ("--preference-data", a.preference_data),
                                ("--preference-eval-data", a.preference_eval_data), ("--eval-prompts", a.eval_prompts)):
                if value:
                    flags += [flag, value]
            if a.launcher:
                flags += ["--launcher", a.launcher]
            if a.report_to != ["none"]:
                flags += ["--report-to", *a.report_to]
            self.steps.run("round1 pipeline", layout.actor(1) / "config.json", lambda: run_script("pipeline.py", flags))
        if self.source.judged():
            self.steps.run("round1 eval", layout.eval_json(1), lambda: self.evaluate(1, with_sft=True),
                           inputs=self.eval_inputs(1, with_sft=True))

    # -- collect, label --------------------------------------------------------------------------
    def collect(self, r):
        collect.collect(self, r)

    def label(self, r):
        label.label(self, r)

    # -- score models ----------------------------------------------------------------------------
    def train_score_models(self, r):
        a, jobs = self.args, []
        for objective in ("reward", "cost"):
            product = self.layout.score_model(r, objective)
            init = self.layout.sft if a.score_init == "sft" else self.layout.score_model(r - 1, objective)
            flags = ["--objective", objective, "--model", init, "--out", product.parent, "--seed", a.seed,
                     "--data", ",".join(self.preference_files(r, "train"))]
            evals = self.preference_files(r, "eval")
            if evals:
                flags += ["--eval-data", ",".join(evals)]
            flags += self.stage_flags() + shlex.split(a.score_args)
            jobs.append((f"round{r} {objective} model", product / "config.json", "train_score.py", flags))
        if a.jobs > 1:  # both at once, each its own process
            self.steps.run_together(jobs, self.launcher)
            return
        for name, product, script, flags in jobs:
            self.steps.run(name, product, lambda script=script, flags=flags: run_script(script, flags, self.launcher))

    # -- PTX data (real data) --------------------------------------------------------------------
    def first_ppo_flag(self, flag):
        """A flag round 1's PPO ran with: from the flags pipeline.py kept beside its product
        (pipeline_flags.json), else from its checkpoints' state.json; None when neither says."""
        made_with = self.layout.dir(1) / "ppo_lag" / "pipeline_flags.json"
        if made_with.exists():
            try:
                flags = json.loads(made_with.read_text())
                return flags[len(flags) - flags[::-1].index(flag)] if flag in flags else None  # the last one wins
            except (ValueError, IndexError, AttributeError):
                pass
        return self.ppo_arg(1, flag.removeprefix("--").replace("-", "_"))

    def ptx_data(self):
        """Real data: the SFT data of every later round's PTX term (the authors' recipe, which ppo_lag.py
        takes on data files, adds it and refuses to run without it): --ptx-data, else round 1's."""
        if not self.source.real:
            return None
        return self.args.ptx_data or self.first_ppo_flag("--ptx-data")

    def check_ptx(self):
        """Real data: stop before a round collects (and people label) when its PPO would stop for want of
        PTX data, after the labels and the score models' training."""
        ppo_args = shlex.split(self.args.ppo_args)
        if (self.source.real and self.args.rounds > 1 and not self.ptx_data()
                and not {"--ptx-data", "--ptx-coeff", "--recipe"} & {f.split("=")[0] for f in ppo_args}):
            sys.exit("real data: every later round's PPO takes the authors' recipe, whose PTX term needs the SFT "
                     f"data, and round 1 ({self.layout.dir(1)}) records none: pass --ptx-data FILE (the SFT data, "
                     "e.g. pipeline.py's --sft-data), or --ppo-args '--ptx-coeff 0' to train without it")

    # -- threshold -------------------------------------------------------------------------------
    def ppo_arg(self, r, name, convert=lambda value: value):
        """A flag round r's PPO ran with (`name` as its dest: "threshold", "ptx_data"), converted, from its
        newest checkpoint's state.json that has it; None when none does."""
        for state in sorted((self.layout.dir(r) / "ppo_lag" / "checkpoints").glob("*/state.json"), reverse=True):
            try:
                return convert(json.loads(state.read_text())["args"][name])
            except (KeyError, ValueError, TypeError):
                continue
        return None

    def threshold_of(self, r):
        """The threshold round r's PPO used (round 1: pipeline.py's, read from its checkpoint flags)."""
        path = self.layout.dir(r) / "threshold.json"
        if path.exists():
            return json.loads(path.read_text())["threshold"]
        threshold = self.ppo_arg(r, "threshold", float)
        if threshold is not None:
            return threshold
        return self.source.first_threshold() if r == 1 else None

    def derive(self, r) -> dict:
        """Round r's threshold on its cost model's scale: from the costs of the last policy's answers
        collected this round (iterated/threshold.py), with the quantile rule beside it; round 1 (no
        collected answers): the quantile rule only."""
        from scoring import Scorer

        a, d = self.args, self.layout.dir(r)
        cost_model = self.layout.score_model(r, "cost")
        stats = json.loads((cost_model / "config.json").read_text()).get("score_stats")
        if not stats or "q05" not in stats:
            raise ValueError(f"{cost_model}: no score quantiles in config.json (train_score.py writes them)")
        h = self.source.harmful_share(self.training_prompts(r))
        files = self.preference_files(r, "eval") if r > 1 else self.source.base_preferences()[1]
        by_quantiles = derive_threshold(stats, unsafe_share(files) if files else 1 / 3, h, a.target_harmful_rate)
        if r == 1:
            return {**by_quantiles, "rule": "quantiles", "score_stats": stats}
        rows = read_jsonl(d / "label" / "preferences.jsonl")
        winners = [(x["prompt"], x[f"response_{x['better_response_id']}"]) for x in rows
                   if x[f"is_response_{x['better_response_id']}_safe"]]
        unsafe = [(x["prompt"], x[f"response_{i}"]) for x in rows for i in (0, 1) if not x[f"is_response_{i}_safe"]]
        # every answer the last policy gave this round's prompts (PPO's prompts): its J_C on the new scale
        answered = [(row["prompt"], t) for row in read_jsonl(d / "collect" / "answers.jsonl") for t in row["answers"]]
        costs = Scorer(cost_model, a.device).texts(winners + unsafe + answered).tolist()
        labelled, answered_costs = costs[:len(winners) + len(unsafe)], costs[len(winners) + len(unsafe):]
        if not winners:
            print(f"warning: no answer of round {r} is labelled both safe and more helpful; the threshold falls back "
                  "to the quantile rule", flush=True)
        result = threshold_for_round(labelled[:len(winners)], labelled[len(winners):], answered_costs, h,
                                     a.target_harmful_rate, by_quantiles, a.threshold_rule)
        result.update(self.source.threshold_diagnostics(winners + unsafe, labelled))
        return {**result, "quantile_rule": by_quantiles, "score_stats": stats}

    def threshold(self, r):
        result = self.derive(r)
        result["previous"] = self.threshold_of(r - 1)
        write_json(self.layout.dir(r) / "threshold.json", result)  # the step's product: whole or not at all
        # c_safe and c_harm are the policy's labelled answers' costs, or (no answer labelled both safe and more
        # helpful) the cost model's held-out score quantiles: say which
        read = ("the last policy's helpful safe answers cost" if result["rule"].startswith("helpful-safe")
                else "no labelled answer to read, so the held-out score quantiles: safe answers cost")
        print(f"threshold: {result['threshold']:.3f} on round {r}'s cost model ({result['rule']}: {read} "
              f"{result['c_safe']:.3f}, unsafe ones {result['c_harm']:.2f}; the quantile "
              f"rule would give {result['quantile_rule']['threshold']:.3f}; the last policy's own cost on this round's "
              f"prompts: {result.get('last_policy_cost', float('nan')):.3f}); round {r - 1} used {result['previous']}",
              flush=True)

    # -- PPO-Lagrangian, evaluation --------------------------------------------------------------
    def ppo(self, r):
        a, layout = self.args, self.layout
        threshold = json.loads((layout.dir(r) / "threshold.json").read_text())["threshold"]
        flags = ["--algo", "ppo_lag", "--actor", layout.actor(r - 1), "--reward-model", layout.score_model(r, "reward"),
                 "--cost-model", layout.score_model(r, "cost"), "--prompts", self.training_prompts(r),
                 "--threshold", f"{threshold:.4f}", "--out", layout.actor(r).parent, "--seed", a.seed]
        if a.reference == "sft":
            flags += ["--reference", layout.sft]
        carried = self.final_lambda(r - 1) if a.carry_lambda else None
        if carried is not None:
            flags += ["--lambda-init", f"{carried:.6g}"]
        if self.ptx_data():  # before --ppo-args, which may name another
            flags += ["--ptx-data", self.ptx_data()]
        run_script("ppo_lag.py", flags + self.stage_flags() + shlex.split(a.ppo_args), self.launcher)

    def final_lambda(self, r) -> float | None:
        """Where round r's multiplier ended (its PPO log's last line). Round r + 1's policy starts where
        round r's ended, at the constraint's boundary, so the multiplier starts at that boundary's price
        too: from 1 instead, it lags while the reward pulls the cost above the new limit, and the round
        ends over it (measured in bench/RESULTS.md)."""
        log = self.layout.dir(r) / "ppo_lag" / "log.jsonl"
        lambdas = [row["lambda"] for row in read_jsonl(log) if row.get("lambda") is not None] if log.exists() else []
        if not lambdas:
            print(f"warning: {log}: no lambda logged by round {r}'s PPO-Lagrangian; round {r + 1}'s multiplier "
                  "starts at ppo_lag.py's --lambda-init instead", flush=True)
            return None
        return lambdas[-1]

    def evaluate(self, r, with_sft=False):
        a, layout = self.args, self.layout
        flags = ["--reward-model", layout.score_model(r, "reward"), "--cost-model", layout.score_model(r, "cost"),
                 "--show", "0", "--synthetic-dir", layout.synthetic_dir]
        if a.eval_prompts:
            flags += ["--prompts", a.eval_prompts]
        flags += shlex.split(a.eval_args)
        if not self.source.judged():
            run_script("evaluate.py", ["--arena", layout.actor(r - 1), layout.actor(r), "--out", layout.dir(r) / "arena",
                                       *flags])
            return
        models = ([layout.sft] if with_sft else []) + [layout.actor(r)]
        run_script("evaluate.py", ["--models", *models, "--out", layout.eval_json(r).parent, *flags])

    def eval_product(self, r) -> Path:
        return self.layout.eval_json(r) if self.source.judged() else self.layout.dir(r) / "arena" / "arena.json"

    def eval_inputs(self, r, with_sft=False) -> list[Path]:
        """The models round r's evaluation reads: one made again after it makes it out of date (Steps.run)."""
        layout = self.layout
        policies = ([layout.sft] if with_sft else []) if self.source.judged() else [layout.actor(r - 1)]
        models = [*policies, layout.actor(r), layout.score_model(r, "reward"), layout.score_model(r, "cost")]
        return [Path(m) / "config.json" for m in models]


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
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
    a("--device", default="auto", help="device of collect (generation) and the label diagnostics (auto: cuda when "
                                       "there is a GPU, else cpu, as the stages)")
    a("--report-to", nargs="+", choices=REPORT_TO, default=["none"],
      help="experiment trackers of every stage (each stage its own run): tensorboard, wandb")
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
                   help="the threshold allows this harmful-answer rate on the training prompts' harmful ones "
                        "(held-out prompts come out more harmful than training ones: bench/RESULTS.md)")
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
    g.add_argument("--sft-data", default=None,
                   help="round 1's SFT data (pipeline.py --sft-data; real data without --from), which round 1's PPO "
                        "also takes as its PTX data")
    g.add_argument("--preference-data", default=None, help="round 1's preference data (default: the embedded task's)")
    g.add_argument("--preference-eval-data", default=None, help="round 1's held-out preference data")
    g.add_argument("--eval-prompts", default=None, help="fixed evaluation prompts (default: the embedded task's held-out ones)")
    g.add_argument("--ptx-data", default=None,
                   help="the SFT data of the PTX term of every later round's PPO (the authors' recipe on real data "
                        "needs it; default: the --ptx-data round 1's PPO ran with, as pipeline.py passes its --sft-data)")
    g.add_argument("--labels", default=None, help="the labelled pairs of the round waiting for labels (default: <round>/label/labelled.jsonl)")
    args = parser.parse_args(argv)
    if args.device == "auto":  # a 7B policy generating on the CPU would take hours
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.samples_per_prompt < 2 or args.pairs_per_prompt < 1:
        parser.error("--samples-per-prompt must be at least 2 and --pairs-per-prompt at least 1: a pair to label is "
                     "two answers to one prompt")
    if not 0 <= args.red_team_share <= 1 or not 0 <= args.eval_fraction < 1:
        parser.error("--red-team-share must be in [0, 1] and --eval-fraction in [0, 1)")
    if args.prompts and not args.eval_prompts:
        parser.error("real data (--prompts) needs --eval-prompts: the fixed prompts every round is evaluated on")
    if args.prompts and not (args.preference_data or args.from_dir):
        parser.error("real data (--prompts) needs --preference-data (round 1's preferences, retrained on in every round)")
    if args.prompts and not (args.sft_data or args.from_dir or "--sft-data" in args.pipeline_args):
        parser.error("real data (--prompts) without --from needs --sft-data: round 1's SFT (pipeline.py) would "
                     "otherwise train on the embedded synthetic task")
    cli.check_out_dir(args.out)
    return args



def main(argv=None):
    args = parse_args(argv)
    rounds = Rounds(args)
    rounds.check_flags()
    t_start = time.time()
    rounds.round_one()
    rounds.check_ptx()
    for r in range(2, args.rounds + 1):
        d, steps = rounds.layout.dir(r), rounds.steps
        print(f"\n######## round {r}: from {rounds.layout.actor(r - 1)}", flush=True)
        steps.run(f"round{r} collect", d / "collect" / "pairs.jsonl", lambda: rounds.collect(r))
        steps.run(f"round{r} label", d / "label" / "label.json", lambda: rounds.label(r))
        rounds.train_score_models(r)
        steps.run(f"round{r} threshold", d / "threshold.json", lambda: rounds.threshold(r),  # on this cost model's scale
                  inputs=[rounds.layout.score_model(r, "cost") / "config.json", d / "label" / "preferences.jsonl"])
        steps.run(f"round{r} ppo_lag", rounds.layout.actor(r) / "config.json", lambda: rounds.ppo(r))
        steps.run(f"round{r} eval", rounds.eval_product(r), lambda: rounds.evaluate(r), inputs=rounds.eval_inputs(r))
    result = report.summary(rounds, args.rounds)
    print(f"time this invocation: {(time.time() - t_start) / 60:.1f} min; steps run so far: "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in rounds.steps.timings.items()))
    return result


if __name__ == "__main__":
    cli.run(main)  # an expected user error prints one line, as in the stage scripts
