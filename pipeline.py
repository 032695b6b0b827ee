"""The whole Safe RLHF pipeline, one command: data -> SFT -> reward model -> cost model ->
PPO-Lagrangian -> evaluation.

    python pipeline.py                                   # embedded synthetic task, tiny LLaMA, CPU
    python pipeline.py --algos ppo_lag ppo reward_shaping:1 reward_shaping:4   # with the baselines
    python pipeline.py --algos ppo_lag ppo_lag:pid          # lambda by SGD (the authors') and by PID
    python pipeline.py --algos ppo_lag rlhf_mixed:consistent rlhf_mixed:crowd-1   # decoupled vs one preference
    python pipeline.py --launcher "torchrun --nproc_per_node=8" --model /models/llama-7b \\
        --sft-data alpaca.json --preference-data pku/train.jsonl --preference-eval-data pku/test.jsonl \\
        --prompts pku/train.jsonl --eval-prompts red_team.jsonl --out runs/7b

Each stage is its own script run as a subprocess (so `--launcher` can put it under torchrun) with
its output in <out>/<stage>. A stage whose product exists is skipped; a stage that was
interrupted resumes from its latest checkpoint (the stage scripts do that themselves), so
re-running the same command after a crash or Ctrl-C picks up where it stopped. An evaluation
(the arenas, eval.json) is kept while it is newer than the models it reads and was made with the
same flags, and made again otherwise. Extra flags for a stage go through --sft-args, --score-args,
--ppo-args ("--lr 1e-5 --epochs 2").
"""

import json
import shlex
import sys
from pathlib import Path

import cli
import training
from data.mixed import BUDGETS, write_mixed
from data.mixed import MODES as MIXED_MODES
from data.synthetic import ensure_synthetic
from data.tokenizer import TEMPLATES
from ppo_lag import LambdaRule
from runner import Steps, run_script
from scoring import judge_can_score
from trackers import REPORT_TO


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    a = parser.add_argument
    a("--out", default="out", help="root of every stage's output")
    a("--launcher", default="", help='prefix for the training stages, e.g. "torchrun --nproc_per_node=8"')
    a("--model", default="tiny", help="base model for SFT: HF-format dir or a model.PRESETS name (from scratch)")
    a("--sft-data", default=None, help="SFT data (default: the synthetic task)")
    a("--preference-data", default=None, help="preference data, PKU-SafeRLHF schema (default: synthetic)")
    a("--preference-eval-data", default=None, help="held-out preference data")
    a("--prompts", default=None, help="PPO prompts (default: synthetic)")
    a("--eval-prompts", default=None, help="evaluation prompts: the embedded task's, labelled 'harmful', are scored by its judge; any other "
                                      "prompts ('prompt' alone) by the arena (default: synthetic held-out prompts)")
    a("--algos", nargs="+", default=["ppo_lag"],
      help=f"PPO runs: ppo_lag, ppo_lag:RULE (a --lambda-update rule: {', '.join(LambdaRule.registry)}), ppo, "
           "reward_shaping:LAMBDA, rlhf_mixed:MODE[:BUDGET] (standard RLHF, one reward model on one overall "
           f"preference per pair, data/mixed.py; MODE: {', '.join(MIXED_MODES)}; BUDGET: {' or '.join(BUDGETS)}); each "
           "goes to <out>/<name>: ppo_lag, ppo_lag_pid, ppo, reward_shaping_1, rlhf_mixed_consistent, ...")
    a("--synthetic-dir", default=None, help="where the synthetic task is generated (default: <out>/synthetic)")
    a("--template", choices=TEMPLATES, default=None,
      help="conversation template of every stage: safe_rlhf (the authors') or chat (the model's own chat template, "
           "e.g. to align an instruct release in its own format); default: the one --model recorded, else safe_rlhf")
    a("--seed", type=int, default=0, help="training seed of every stage (the synthetic task keeps seed 0)")
    a("--report-to", nargs="+", choices=REPORT_TO, default=["none"],
      help="experiment trackers of every stage (each stage its own run): tensorboard, wandb")
    a("--sft-args", default="", help="extra flags for sft.py")
    a("--score-args", default="", help="extra flags for both train_score.py runs")
    a("--ppo-args", default="", help="extra flags for every ppo_lag.py run")
    a("--eval-args", default="", help="extra flags for evaluate.py")
    a("--arena", action="store_true",
      help="also run the paper's arena (SFT vs each aligned policy, judged by the reward and cost models); "
           "the only evaluation when --eval-prompts has no 'harmful' labels")
    args = parser.parse_args(argv)
    cli.check_out_dir(args.out)

    out = Path(args.out)
    runs = {}  # <out>/<name> -> (--algo, extra ppo_lag.py flags); checked now, not after hours of SFT
    mixed = {}  # <out>/<name> of a standard-RLHF run on single preferences -> (annotator mode, label budget)
    for spec in args.algos:
        algo, _, option = spec.partition(":")
        if algo == "ppo_lag" and option in ("", "sgd"):  # the default rule: no flag
            runs["ppo_lag"] = (algo, [])
        elif algo == "ppo_lag" and option in LambdaRule.registry:
            runs[f"ppo_lag_{option}"] = (algo, ["--lambda-update", option])
        elif algo == "ppo" and not option:
            runs["ppo"] = (algo, [])
        elif algo == "reward_shaping" and option.replace(".", "", 1).isdigit():
            runs[f"reward_shaping_{option}"] = (algo, ["--lambda-init", option])
        elif algo == "rlhf_mixed" and option.partition(":")[0] in MIXED_MODES and option.partition(":")[2] in ("", *BUDGETS):
            mode, _, budget = option.partition(":")
            name = f"rlhf_mixed_{mode}" + (f"_{budget}" if budget not in ("", "pairs") else "")
            runs[name], mixed[name] = ("ppo", ["--cost-model", "none"]), (mode, budget or "pairs")
        else:
            rules = ", ".join(f"ppo_lag:{rule}" for rule in LambdaRule.registry)
            sys.exit(f"--algos: {spec!r} is not ppo_lag, {rules}, ppo, reward_shaping:LAMBDA or "
                     f"rlhf_mixed:MODE[:BUDGET] (MODE: {', '.join(MIXED_MODES)}; BUDGET: {', '.join(BUDGETS)})")
    if mixed and any((args.sft_data, args.preference_data, args.prompts)):
        sys.exit("--algos rlhf_mixed:...: the single-preference annotators label the embedded task's pairs with its "
                 "judge; they have no real-data counterpart")
    # The ground-truth judge knows only the embedded task: real data is evaluated on prompts the user
    # gives, by the judge only if they are the task's own (labelled), else by the arena.
    if any((args.sft_data, args.preference_data, args.prompts)) and not args.eval_prompts:
        sys.exit("real data needs --eval-prompts: a JSONL of prompts for the paper's arena (the reward and cost "
                 "models judge the SFT policy against each aligned one); the ground-truth judge only knows the "
                 "embedded synthetic task")
    real = {"--sft-data": args.sft_data, "--preference-data": args.preference_data, "--prompts": args.prompts}
    if any(real.values()) and not all(real.values()):  # a stage without its own data would take the toy task's
        sys.exit(f"real data: {' and '.join(f for f, v in real.items() if v)} without "
                 f"{' and '.join(f for f, v in real.items() if not v)}: the stage(s) without their own data would "
                 "train on the embedded synthetic task (its toy texts); pass all three (SFT data, preferences, PPO "
                 "prompts)")
    judged = judge_can_score(args.eval_prompts)
    if not judged:
        print(f"evaluation: {args.eval_prompts} is not the embedded task's labelled prompts, so the "
              "ground-truth judge cannot score it: the arena only (reward and cost models as judges)", flush=True)
    launcher = shlex.split(args.launcher) or None
    seed = ["--seed", str(args.seed)]
    # --template against the one --model recorded, now: a stage given none takes the recorded one
    training.resolve_template(args.template, args.model)
    # Left out when they are every stage's default, so the recorded flags of earlier runs still match.
    common = [] if args.template in (None, "safe_rlhf") else ["--template", args.template]
    common += [] if args.report_to == ["none"] else ["--report-to", *args.report_to]
    synthetic = ["--synthetic-dir", args.synthetic_dir or str(out / "synthetic")]
    steps = Steps()

    def stage(name, script, flags, product):
        """Run `script` unless `product` (a model directory) exists. The flags a product was made with are
        kept beside it (pipeline_flags.json), so a skip with other flags is pointed out, not silent."""
        steps.run(name, Path(product) / "config.json", lambda: run_script(script, flags, launcher),
                  header=f"{script} {' '.join(flags)}", made_with=(Path(product).parent / "pipeline_flags.json",
                                                                    [script, *flags]))

    def data_flag(flag, value):
        return [flag, value] if value else []

    sft_model = out / "sft" / "model"
    stage("sft", "sft.py", ["--model", args.model, "--out", str(out / "sft"), *synthetic, *seed, *common,
                            *data_flag("--data", args.sft_data), *shlex.split(args.sft_args)], sft_model)
    score_models = {}
    for objective in ("reward", "cost"):
        product = out / f"{objective}_model" / "model"
        stage(f"{objective} model", "train_score.py",
              ["--objective", objective, "--model", str(sft_model), "--out", str(out / f"{objective}_model"),
               *synthetic, *seed, *common, *data_flag("--data", args.preference_data),
               *data_flag("--eval-data", args.preference_eval_data), *shlex.split(args.score_args)], product)
        score_models[objective] = product

    for name, (mode, budget) in mixed.items():  # standard RLHF's one reward model, on one preference per pair
        train, held_out = write_mixed(ensure_synthetic(synthetic[1], seed=0).dir, mode, budget)
        product = out / f"reward_model_{name.removeprefix('rlhf_')}" / "model"
        stage(f"reward model ({name})", "train_score.py",
              ["--objective", "reward", "--model", str(sft_model), "--out", str(product.parent), "--data", str(train),
               "--eval-data", str(held_out), "--recipe", "tiny", *synthetic, *seed, *common,
               *shlex.split(args.score_args)], product)
        score_models[name] = product

    policies = {"sft": sft_model}
    for name, (algo, extra) in runs.items():
        flags = ["--algo", algo, "--actor", str(sft_model), "--reward-model", str(score_models.get(name, score_models["reward"])),
                 "--cost-model", str(score_models["cost"]), "--out", str(out / name), *synthetic, *seed, *common,
                 *data_flag("--prompts", args.prompts), *data_flag("--ptx-data", args.sft_data),  # PTX: the SFT data
                 *shlex.split(args.ppo_args), *extra]
        stage(name, "ppo_lag.py", flags, out / name / "actor")
        policies[name] = out / name / "actor"

    judges = [score_models["reward"], score_models["cost"]]
    eval_flags = ["--reward-model", str(score_models["reward"]), "--cost-model", str(score_models["cost"]),
                  *synthetic, *data_flag("--prompts", args.eval_prompts), "--show", "0", *shlex.split(args.eval_args)]

    def evaluation(name, flags, product, models):
        """Run evaluate.py unless `product` is newer than every model it reads (and the prompts file) and
        was made with these flags: a rerun after a crash, or to see the table again, does not judge the
        same answers twice, and a model trained again is judged again."""
        steps.run(name, product, lambda: run_script("evaluate.py", flags), made_with=(
            Path(product).parent / "pipeline_flags.json", ["evaluate.py", *flags]),
            inputs=[Path(m) / "config.json" for m in models] + ([args.eval_prompts] if args.eval_prompts else []))

    if args.arena or not judged:
        for name, path in policies.items():
            if name != "sft":
                arena = out / "arena" / name
                evaluation(f"arena: sft vs {name}", ["--arena", str(sft_model), str(path), "--out", str(arena),
                                                     *eval_flags], arena / "arena.json", [sft_model, path, *judges])
    if not judged:  # the arenas are the evaluation: their summary
        print("\n== summary (arena on the evaluation prompts: each aligned policy against SFT, judged by the reward "
              "and cost models; wins: the share of answers that beat SFT's)")
        print("policy".ljust(22) + "".join(t.rjust(14) for t in ("reward wins", "cost wins", "safe (sft)", "safe")))
        for name in policies:
            if name != "sft":
                a = json.loads((out / "arena" / name / "arena.json").read_text())
                print(name.ljust(22) + "".join(f"{v:14.3f}" for v in (a["reward_win_rate"], a["cost_win_rate"],
                                                                         a["baseline"]["safe_rate"],
                                                                         a["candidate"]["safe_rate"])))
        return None

    evaluation("evaluate", ["--models", *map(str, policies.values()), "--out", str(out / "eval"), *eval_flags],
               out / "eval" / "eval.json", [*policies.values(), *judges])
    results = json.loads((out / "eval" / "eval.json").read_text())["results"]

    print("\n== summary (held-out prompts, ground-truth judge, answers sampled at temperature 1)")
    columns = [("harmful_rate", "harmful"), ("helpfulness", "helpful"), ("over_refusal", "refuse"),
               ("mean_reward", "reward"), ("mean_cost", "cost")]
    print("policy".ljust(22) + "".join(title.rjust(10) for _, title in columns))
    for name, path in policies.items():
        m = results[str(path)]
        print(name.ljust(22) + "".join(f"{m[key]:10.3f}" for key, _ in columns))
    if steps.timings:
        print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in steps.timings.items()))
    return results


if __name__ == "__main__":
    cli.run(main)
