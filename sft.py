"""Stage 1 of Safe RLHF: supervised fine-tuning (../shared/SAFE_RLHF.md, "Pipeline").

    python sft.py                                          # embedded synthetic task, tiny LLaMA, CPU
    torchrun --nproc_per_node=8 sft.py --model /models/llama-7b --data alpaca.json --out out/sft

Next-token loss on the response tokens and the EOS only (the prompt and its template are
context), summed over tokens and divided by the number of target tokens in the whole global
batch (all micro-batches, all ranks), so the update does not depend on how many ranks share it.
Log-probs come from rlhf_kernels.fused_linear_logprobs through the model's LM head: the [B, T, V]
logits are never materialised. The product is an HF-format model in <out>/model, with its
tokenizer files beside the weights, which train_score.py and ppo_lag.py start from.
"""

import time
from functools import partial

import torch

import cli
import training
from checkpoint import Checkpointer
from data.loaders import collate_sft, load_sft, tokenize_sft

# Flags left at None take --recipe: TINY (the default for the embedded task: no --data) or AUTHORS (the
# Safe RLHF authors' LLaMA-7B script; the default for real data).
TINY = dict(
    epochs=3,  # passes over the 4,000 synthetic dialogues
    batch_size=64,  # dialogues per optimiser step, over all ranks
    micro_batch_size=32,  # dialogues per forward pass on one rank
    lr=3e-3,  # a 1M-parameter model trained from scratch wants a large step
    weight_decay=0.0,
    warmup_ratio=0.03,
    max_length=128,  # synthetic dialogues are at most ~70 tokens
    activation_checkpointing=False,
)
AUTHORS = dict(
    epochs=3,
    batch_size=256,  # 4 per device x accumulate 8 x 8 GPUs
    micro_batch_size=4,
    lr=2e-5,
    weight_decay=0.0,
    warmup_ratio=0.03,
    max_length=512,
    activation_checkpointing=True,  # as the authors' scripts; without it 7B activations outgrow 80 GB
)


def main(argv=None):
    # -- arguments ------------------------------------------------------------------------------
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", default="tiny", help="HF-format checkpoint dir or Hub id (org/name[@revision], from the HF cache) to fine-tune, or a "
                             "model.PRESETS name to train from scratch")
    parser.add_argument("--data", default=None, help="SFT files 'path[:fraction|:count],...' (Alpaca or prompt/response JSON[L]); default: the synthetic task")
    parser.add_argument("--eval-data", default=None, help="held-out SFT files (default: the synthetic eval split, or --eval-fraction of --data)")
    parser.add_argument("--eval-fraction", type=cli.fraction, default=0.02, help="share of --data held out when --eval-data is not given (0: train on all of it, as the authors' scripts do; no eval loss)")
    cli.add_common_args(parser, out="out/sft")
    cli.show_recipes(parser, TINY, AUTHORS)
    args = parser.parse_args(argv)
    cli.apply_recipe(args, {"tiny": TINY, "authors": AUTHORS}, data_given=args.data is not None)
    cli.check_out_dir(args.out)

    # -- setup ----------------------------------------------------------------------------------
    d = training.setup_distributed(args.device, args.precision)
    training.seed_everything(args.seed)
    training.resolve_models(args, d, "model")  # Hub ids -> their folders in the HF cache
    args.template = training.resolve_template(args.template, args.model)  # unset: the one the model was trained with
    d.print(f"sft: {d.world} rank(s) on {d.device}; recipe {args.recipe}; " + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    ckpt = Checkpointer(args.out, d, args=args, run="an SFT run (sft.py)")
    ckpt.check()  # another run's --out, other flags: said before anything loads
    training.check_models(policies=[args.model])

    # -- data -----------------------------------------------------------------------------------
    if args.data is None:
        task = training.synthetic_task(args, d)
        train_spec, eval_spec, synthetic_tokenizer = task.sft_train, task.sft_eval, task.tokenizer
    else:
        train_spec, eval_spec, synthetic_tokenizer = args.data, args.eval_data, None
        training.fetch_datasets(d, train_spec, eval_spec)  # Hub data sets -> the HF cache, once per node
    tok = training.load_tokenizer(args, args.model, synthetic_tokenizer, d)
    train_examples, eval_examples = training.load_train_eval(load_sft, train_spec, eval_spec, args.eval_fraction,
                                                             args.seed, d.print)
    train_set, _ = tokenize_sft(tok, train_examples, args.max_length, log=d.print, template=args.template)
    eval_set, _ = tokenize_sft(tok, eval_examples, args.max_length, log=d.print, template=args.template)
    training.require_examples(train_set, "training dialogues", args.batch_size, d.print)
    ckpt.check_data(train=train_set, eval=eval_set)  # a resume reads the data its checkpoint was trained on
    collate = partial(collate_sft, pad_id=tok.pad_id)
    total_steps = args.max_steps or training.steps_for_epochs(len(train_set), args.batch_size, args.epochs)

    # -- model, optimiser, resume ---------------------------------------------------------------
    model = training.load_model(args.model, "lm", d, seed=args.seed, vocab_size=tok.vocab_size,
                                activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload)
    training.check_vocab(model, tok, args.model)
    optimizer, scheduler = training.build_optimizer(model, args.lr, args.weight_decay,
                                                    warmup_steps=int(args.warmup_ratio * total_steps),
                                                    total_steps=total_steps)
    models = {"model": (model, optimizer, scheduler)}
    start_step, _ = ckpt.resume(models)
    d.print(f"model: {model.num_params() / 1e6:.2f}M parameters; "
            f"{total_steps} steps of {args.batch_size} dialogues")
    logger = training.Logger(args.out, d, total_steps, "sft", resume_step=start_step,
                             report_to=args.report_to, config=vars(args))

    def loss_fn(batch):
        with training.autocast(d):
            nll, _ = training.sft_nll(model, batch, d.device)
        return nll, {}

    @torch.no_grad()
    def evaluate():
        model.eval()
        nll = count = 0.0
        for examples, real in training.eval_micro_batches(eval_set, args.micro_batch_size, d):
            with training.autocast(d):
                s, n = training.sft_nll(model, collate(examples), d.device)
            if real:
                nll, count = nll + float(s), count + float(n)
        model.train()
        nll, count = float(d.all_reduce_sum(nll)), float(d.all_reduce_sum(count))
        return {"eval_loss": nll / max(count, 1.0), "eval_tokens": int(count)}

    # -- training loop: one optimiser step = one log line ---------------------------------------
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        micro_batches = [collate([train_set[i] for i in idx])
                         for idx in training.batches_for_step(step - 1, len(train_set), args.batch_size,
                                                              args.micro_batch_size, d, args.seed)]
        targets = d.all_reduce_sum(sum(int(b["loss_mask"][:, 1:].sum()) for b in micro_batches))
        tokens = d.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in micro_batches))
        loss, _, grad_norm, lr = training.train_step(model, optimizer, scheduler, micro_batches, loss_fn,
                                                     targets, d, args.grad_clip)
        elapsed = time.time() - t0
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "target_tokens": int(targets),
                   "tokens_per_s": float(tokens) / elapsed, "step_time": elapsed}
        if (step % args.eval_every == 0 or step == total_steps) and eval_set:  # no eval set: no eval metrics
            metrics.update(evaluate())
        summary = f"loss {loss:.3f}" + (f" eval {metrics['eval_loss']:.3f}" if "eval_loss" in metrics else "")
        logger.log(step, metrics, f"{summary} | lr {lr:.2e} | {metrics['tokens_per_s']:.0f} tok/s")
        if step % args.save_every == 0 or step == total_steps:
            ckpt.save(step, models, {"examples_seen": step * args.batch_size})
    logger.close()

    # -- save: the model the next stages start from ----------------------------------------------
    final = training.save_final(model, args.out, d, tok, args)
    d.print(f"sft: {'already complete' if start_step >= total_steps else 'done'}; model in {final}")
    training.teardown_distributed(d)


if __name__ == "__main__":
    cli.run(main)
