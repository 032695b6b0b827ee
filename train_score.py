"""Stage 2 of Safe RLHF: the reward model and the cost model (../shared/SAFE_RLHF.md, "Score models").

    python train_score.py --objective reward              # embedded task, from out/sft/model
    python train_score.py --objective cost
    torchrun --nproc_per_node=8 train_score.py --objective cost --model out/sft/model \\
        --data PKU-SafeRLHF/train.jsonl --eval-data PKU-SafeRLHF/test.jsonl --out out/cm

A score model is the SFT model's body with a new head, Linear(dim, 1), read at each sequence's
last real token (its EOS): the "end score". The reward model learns which of two answers is more
helpful; the cost model which is more harmful, plus the sign of each answer's cost (safe < 0 <
harmful), so that 0 is a meaningful threshold for PPO-Lagrangian. Both halves of every pair go
through one forward pass. Eval reports accuracy (and the cost model's sign accuracy) and the
distribution of end scores: PPO's cost threshold must be picked on that scale.
"""

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

import cli
import fileio
import hf_io
import training
from checkpoint import Checkpointer
from data.loaders import (collate_cost_pairs, collate_reward_pairs, cost_pairs, load_preferences, reward_pairs,
                          tokenize_cost_pairs, tokenize_reward_pairs)
from scoring import batch_end_scores

TINY = dict(
    epochs=2,  # passes over the 4,000 synthetic preference pairs
    batch_size=64,  # pairs per optimiser step, over all ranks
    micro_batch_size=32,  # pairs per forward pass on one rank (2x sequences)
    lr=1e-3,
    weight_decay=0.1,
    warmup_ratio=0.03,
    max_length=128,
    activation_checkpointing=False,
)
AUTHORS = dict(
    epochs=2,
    batch_size=128,  # 16 pairs per device x 8 GPUs
    micro_batch_size=16,
    lr=2e-5,
    weight_decay=0.1,
    warmup_ratio=0.03,
    max_length=512,
    activation_checkpointing=True,  # as the authors' scripts; without it 7B activations outgrow 80 GB
)


# ---------------------------------------------------------------------------------------------
# The two losses, summed over the pairs of a batch (the trainer divides by the global pair count).


def reward_loss(better, worse, mu: float):
    """sum_i [ -log sigma(R_w - R_l) + mu (R_w^2 + R_l^2) / 2 ]  for end scores [B]."""
    return (-F.logsigmoid(better - worse) + mu * (better.square() + worse.square()) / 2).sum()


def cost_loss(safer, less_safe, safer_sign, less_safe_sign, mu: float):
    """sum_i [ -log sigma(C_u - C_s) - log sigma(s_u C_u) - log sigma(s_s C_s) + mu (C_u^2 + C_s^2) / 2 ]
    where s = +1 for a harmful answer and -1 for a safe one (the classification terms)."""
    ranking = -F.logsigmoid(less_safe - safer)
    sign = -F.logsigmoid(less_safe_sign * less_safe) - F.logsigmoid(safer_sign * safer)
    return (ranking + sign + mu * (less_safe.square() + safer.square()) / 2).sum()


def pair_end_scores(model, first_ids, first_mask, second_ids, second_mask):
    """End scores of both halves of each pair from one forward pass over [2B, T]."""
    return batch_end_scores(model, torch.cat([first_ids, second_ids]), torch.cat([first_mask, second_mask])).chunk(2)


@dataclass(frozen=True)
class Objective:
    """Everything that differs between the reward model and the cost model, chosen once by
    --objective. A collated batch holds each pair's two answers as `<first>_input_ids` and
    `<second>_input_ids`; the loss and the metrics read their end scores in that order."""
    name: str
    first: str  # field prefix of the answer the model should score... better (reward) / safer (cost)
    second: str
    safety_labels: bool  # reads the safety labels (and skips PKU rows whose labels contradict safer_response_id)
    make_pairs: Callable  # preference rows -> pairs
    tokenize: Callable  # (tok, pairs, max_length, log, template) -> (tokenized pairs, stats)
    collate: Callable  # (tokenized pairs, pad_id) -> batch dict
    loss: Callable  # (first scores, second scores, batch, mu) -> summed loss over the pairs
    correct: Callable  # (first, second) -> [B] bool: the pair is ordered as labelled
    extra_metrics: tuple[str, ...]  # held-out metrics beyond accuracy...
    per_pair_metrics: Callable  # ... (first, second, batch) -> {name: [B] value per pair}


OBJECTIVES = {
    "reward": Objective(
        "reward", "better", "worse", safety_labels=False, make_pairs=reward_pairs,
        tokenize=tokenize_reward_pairs, collate=collate_reward_pairs,
        loss=lambda better, worse, batch, mu: reward_loss(better, worse, mu),
        correct=lambda better, worse: better > worse,
        extra_metrics=(), per_pair_metrics=lambda better, worse, batch: {}),
    "cost": Objective(
        "cost", "safer", "less_safe", safety_labels=True, make_pairs=cost_pairs,
        tokenize=tokenize_cost_pairs, collate=collate_cost_pairs,
        loss=lambda safer, less_safe, batch, mu: cost_loss(safer, less_safe, batch["safer_sign"],
                                                           batch["less_safe_sign"], mu),
        correct=lambda safer, less_safe: less_safe > safer,
        extra_metrics=("sign_accuracy",),
        # the share of the pair's two answers whose cost sign matches its safety label
        per_pair_metrics=lambda safer, less_safe, batch: {"sign_accuracy": (
            (torch.sign(safer) == batch["safer_sign"]).float() + (torch.sign(less_safe) == batch["less_safe_sign"]).float()) / 2}),
}


def scores_of(model, objective: Objective, batch: dict, d) -> tuple[torch.Tensor, torch.Tensor]:
    """End scores (first, second) of a collated pair batch already on the device."""
    with training.autocast(d):
        return pair_end_scores(model, batch[f"{objective.first}_input_ids"], batch[f"{objective.first}_attention_mask"],
                               batch[f"{objective.second}_input_ids"], batch[f"{objective.second}_attention_mask"])


@torch.no_grad()
def evaluate(model, objective: Objective, eval_set, args, d, collate) -> dict:
    """Held-out accuracy (and the objective's other per-pair metrics) and the distribution of end
    scores over every answer of every rank: PPO's cost threshold is picked on that scale."""
    model.eval()
    scores, sums = [torch.zeros(0)], {}  # a rank may get no pairs
    for examples, real in training.eval_micro_batches(eval_set, args.micro_batch_size, d):
        batch = {k: v.to(d.device) for k, v in collate(examples).items()}
        first, second = scores_of(model, objective, batch, d)
        if not real:
            continue
        first, second = first.float(), second.float()
        for name, per_pair in {"accuracy": objective.correct(first, second).float(),
                               **objective.per_pair_metrics(first, second, batch)}.items():
            sums[name] = sums.get(name, 0.0) + float(per_pair.sum())
        scores += [first.cpu(), second.cpu()]
    model.train()
    all_scores = d.all_gather_cat(torch.cat(scores))
    result = {f"eval_{name}": float(d.all_reduce_sum(sums.get(name, 0.0))) / len(eval_set)
              for name in ("accuracy", *objective.extra_metrics)}
    return {**result, "eval_score_mean": float(all_scores.mean()), "eval_score_std": float(all_scores.std()),
            **{f"eval_score_{k}": v for k, v in quantiles(all_scores).items()}}


def quantiles(values: torch.Tensor) -> dict:
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=values.dtype)
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(qs, torch.quantile(values, qs))}


def main(argv=None):
    # -- arguments ------------------------------------------------------------------------------
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="reward", help="which score model to train")
    parser.add_argument("--model", default="out/sft/model", help="HF-format checkpoint dir or Hub id to start from (the SFT model); a new score head is added")
    parser.add_argument("--data", default=None, help="preference files 'path[:fraction|:count],...' (PKU-SafeRLHF schema); default: the synthetic task")
    parser.add_argument("--eval-data", default=None, help="held-out preference files (default: the synthetic eval split, or --eval-fraction of --data)")
    parser.add_argument("--eval-fraction", type=cli.fraction, default=0.05, help="share of --data held out when --eval-data is not given (not 0: the score statistics PPO's threshold is read from come from it)")
    parser.add_argument("--mu", type=cli.non_negative, default=0.001, help="L2 regularisation of the end scores (keeps them near 0)")
    cli.add_common_args(parser, out=None)
    cli.show_recipes(parser, TINY, AUTHORS)
    args = parser.parse_args(argv)
    cli.apply_recipe(args, {"tiny": TINY, "authors": AUTHORS}, data_given=args.data is not None)
    args.out = args.out or f"out/{args.objective}_model"
    cli.check_out_dir(args.out)
    objective = OBJECTIVES[args.objective]

    # -- setup ----------------------------------------------------------------------------------
    d = training.setup_distributed(args.device, args.precision)
    training.seed_everything(args.seed)
    training.resolve_models(args, d, "model")  # Hub ids -> their folders in the HF cache
    args.template = training.resolve_template(args.template, args.model)  # unset: the one the model was trained with
    d.print(f"train_score ({args.objective}): {d.world} rank(s) on {d.device}; recipe {args.recipe}; "
            + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    ckpt = Checkpointer(args.out, d, args=args,
                        run=f"a {args.objective}-model run (train_score.py --objective {args.objective})")
    ckpt.check()  # another run's --out, other flags: said before anything loads
    hf_io.describe(args.model, "score")  # a bad or missing config.json, before the data loads

    # -- data -----------------------------------------------------------------------------------
    if args.data is None:
        task = training.synthetic_task(args, d)
        train_spec, eval_spec, synthetic_tokenizer = task.preference_train, task.preference_eval, task.tokenizer
    else:
        train_spec, eval_spec, synthetic_tokenizer = args.data, args.eval_data, None
        training.fetch_datasets(d, train_spec, eval_spec)  # Hub data sets -> the HF cache, once per node
    tok = training.load_tokenizer(args, args.model, synthetic_tokenizer, d)
    load_rows = partial(load_preferences, drop_inconsistent=objective.safety_labels,
                        safety_labels=objective.safety_labels)
    train_rows, eval_rows = training.load_train_eval(load_rows, train_spec, eval_spec, args.eval_fraction,
                                                     args.seed, d.print)
    train_set, _ = objective.tokenize(tok, objective.make_pairs(train_rows), args.max_length, log=d.print,
                                      template=args.template)
    eval_set, _ = objective.tokenize(tok, objective.make_pairs(eval_rows), args.max_length, log=d.print,
                                     template=args.template)
    training.require_examples(train_set, "training pairs", args.batch_size, d.print)
    training.require_examples(eval_set, "held-out pairs (the score statistics that PPO's threshold is read from need them)")
    ckpt.check_data(train=train_set, eval=eval_set)  # a resume reads the data its checkpoint was trained on
    collate = partial(objective.collate, pad_id=tok.pad_id)
    total_steps = args.max_steps or training.steps_for_epochs(len(train_set), args.batch_size, args.epochs)

    # -- model, optimiser, resume ---------------------------------------------------------------
    model = training.load_model(args.model, "score", d, seed=args.seed,
                                activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload)
    optimizer, scheduler = training.build_optimizer(model, args.lr, args.weight_decay,
                                                    warmup_steps=int(args.warmup_ratio * total_steps),
                                                    total_steps=total_steps)
    models = {"model": (model, optimizer, scheduler)}
    start_step, _ = ckpt.resume(models)
    d.print(f"model: {model.num_params() / 1e6:.2f}M parameters; {total_steps} steps of {args.batch_size} pairs")
    logger = training.Logger(args.out, d, total_steps, args.objective, resume_step=start_step,
                             report_to=args.report_to, config=vars(args))

    def loss_fn(batch):
        batch = {k: v.to(d.device) for k, v in batch.items()}
        first, second = scores_of(model, objective, batch, d)
        return objective.loss(first, second, batch, args.mu), {"correct": float(objective.correct(first, second).sum())}

    # -- training loop: one optimiser step = one log line ---------------------------------------
    model.train()
    eval_result = {}
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        micro_batches = [collate([train_set[i] for i in idx])
                         for idx in training.batches_for_step(step - 1, len(train_set), args.batch_size,
                                                              args.micro_batch_size, d, args.seed)]
        loss, sums, grad_norm, lr = training.train_step(model, optimizer, scheduler, micro_batches, loss_fn,
                                                        args.batch_size, d, args.grad_clip)
        elapsed = time.time() - t0
        metrics = {"loss": loss, "accuracy": sums["correct"] / args.batch_size, "lr": lr, "grad_norm": grad_norm,
                   "pairs_per_s": args.batch_size / elapsed, "step_time": elapsed}
        if step % args.eval_every == 0 or step == total_steps:
            eval_result = evaluate(model, objective, eval_set, args, d, collate)
            metrics.update(eval_result)
        summary = f"loss {loss:.3f} acc {metrics['accuracy']:.2f}"
        if "eval_accuracy" in metrics:
            summary += f" eval acc {metrics['eval_accuracy']:.3f}"
            summary += "".join(f" {name} {metrics['eval_' + name]:.3f}" for name in objective.extra_metrics)
        logger.log(step, metrics, f"{summary} | lr {lr:.2e}")
        if step % args.save_every == 0 or step == total_steps:
            ckpt.save(step, models, {"examples_seen": step * args.batch_size, "eval": eval_result})
    logger.close()

    # -- save: the model ppo_lag.py loads as reward/cost model and critic initialisation ----------
    if not eval_result:  # resumed a finished run: recompute the statistics saved with the model
        eval_result = evaluate(model, objective, eval_set, args, d, collate)
    model.score_stats = {"objective": args.objective, "mean": eval_result["eval_score_mean"],
                         "std": eval_result["eval_score_std"],
                         **{k.removeprefix("eval_score_"): v for k, v in eval_result.items() if k.startswith("eval_score_q")}}
    if d.is_main:
        fileio.write_json(f"{args.out}/eval.json", eval_result)
    final = training.save_final(model, args.out, d, tok, args)
    d.print(f"{args.objective} model: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_result.items()))
    d.print(f"train_score: {'already complete' if start_step >= total_steps else 'done'}; model in {final}")
    training.teardown_distributed(d)


if __name__ == "__main__":
    cli.run(main)
