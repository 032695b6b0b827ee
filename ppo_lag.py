"""Stage 3 of Safe RLHF: PPO-Lagrangian (../shared/SAFE_RLHF.md, "PPO-Lagrangian").

    python ppo_lag.py                                  # embedded task, from out/sft, out/{reward,cost}_model
    python ppo_lag.py --lambda-update pid              # lambda from a PID controller instead of SGD
    python ppo_lag.py --algo ppo                       # the RLHF baseline: reward only
    python ppo_lag.py --algo reward_shaping --lambda-init 2.0   # fixed lambda: reward R - lambda C
    torchrun --nproc_per_node=8 ppo_lag.py --actor out/sft/model --reward-model out/rm/model \\
        --cost-model out/cm/model --prompts PKU-SafeRLHF/train.jsonl --ptx-data alpaca.json --out out/ppo_lag

maximise E[R(x, y)]  subject to  E[C(x, y)] <= threshold, as the saddle point of
    L(theta, lambda) = -J_R(theta) + lambda (J_C(theta) - threshold),   lambda >= 0.

One iteration (the loop at the end of main):
    rollouts = rollout(...)          sample answers to a batch of prompts with the actor; score them with
                                     the frozen reward and cost models (end scores at the EOS); log-probs
                                     of actor and reference, values of both critics
    multiplier.update(costs)         lambda from the mean cost of the latest episodes (SGD or PID rule)
    advantages(rollouts, lambda)     per-token reward and cost streams (k1 KL penalty, clipped), GAE of each
    ppo_update(...)                  the actor on (A_R - lambda A_C) / (1 + lambda), each critic on its
                                     clipped value loss, optionally the PTX (SFT) loss
    diagnostics(rollouts)            what the log line reports
Every formula is a function at the top of this file, tested against hand-computed values.
"""

import argparse
import math
import time
from collections import deque
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

import cli
import training
from checkpoint import Checkpointer
from data.loaders import collate_prompts, collate_sft, load_prompts, load_sft, tokenize_prompts, tokenize_sft
from data.tokenizer import Tokenizer
from model import DECODE_MODES, Transformer, generation_mask, is_eos
from scoring import TALLIES, batch_end_scores, judge_rates, judge_tallies

TINY = dict(
    epochs=2,  # passes over the 2,000 synthetic PPO prompts (half of them harmful): 63 iterations
    batch_size=64,  # prompts per iteration (rollout batch), over all ranks
    micro_batch_size=32,  # sequences per forward pass per rank (generation and update)
    lr=2e-4,  # actor peak learning rate
    critic_lr=1e-3,
    weight_decay=0.01,
    warmup_ratio=0.03,
    max_length=64,  # longest prompt (tokens, with template); longer prompts are dropped and counted
    max_new_tokens=48,  # answers in the synthetic task are at most 41 tokens with EOS
    kl_coeff=0.05,  # a smaller one lets the answers drift from the SFT model and generalise worse (bench/RESULTS.md)
    threshold=-2.8,  # on the cost model's scale, where safe answers score below 0 and harmful ones above: just
                     # above the safe answers' cost, a small harmful-answer rate allowed (bench/RESULTS.md)
    ptx_coeff=0.0,  # the synthetic SFT data complies with half the harmful requests: no PTX by default
    episode_cost_window=128,  # two iterations
    activation_checkpointing=False,
    save_every=16,  # 63 iterations: a killed run resumes from at most 15 iterations back (the default 100: from the start)
)
AUTHORS = dict(
    epochs=1,
    batch_size=128,  # 16 prompts per device x 8 GPUs
    micro_batch_size=16,
    lr=1e-5,
    critic_lr=5e-6,
    weight_decay=0.01,
    warmup_ratio=0.03,
    max_length=256,
    max_new_tokens=256,  # prompt + response <= 512
    kl_coeff=0.01,  # ppo-lag.sh; see AUTHORS_BASELINE_KL_COEFF for the baselines
    threshold=0.0,  # a placeholder in the authors' scripts: pick it on the cost model's scale
    ptx_coeff=16.0,
    save_every=100,
    # The authors keep 128 episodes per rank and average the 8 ranks' means: 1024 episodes, the
    # last 8 iterations. Here the window is global (results do not depend on the number of ranks).
    episode_cost_window=1024,
    activation_checkpointing=True,  # as the authors' scripts; without it 7B activations outgrow 80 GB
)
AUTHORS_BASELINE_KL_COEFF = 0.02  # the authors' ppo.sh and reward-shaping scripts (ppo-lag.sh: 0.01)


# ---------------------------------------------------------------------------------------------
# The math. Shapes: [B, L-1] over the positions t of a sequence that predict token t+1;
# action_mask is 1 where token t+1 is a response token (the answer and its EOS).


def per_sequence_mean(x, mask):
    """Mean over each sequence's response tokens, [B] (averaged over the batch afterwards)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def token_rewards(kl, end_score, action_mask, kl_coeff: float, clip: float, kl_sign: float):
    """Per-token stream: kl_sign * kl_coeff * kl_t everywhere, plus the end score at the last
    response token, clipped to [-clip, clip]. kl_sign = -1 for the reward stream (r_t),
    +1 for the cost stream (c_t)."""
    stream = kl_sign * kl_coeff * kl * action_mask
    last = action_mask.shape[1] - 1 - action_mask.flip(-1).argmax(-1)  # last response position
    stream = stream.scatter_add(1, last[:, None], end_score[:, None].to(stream.dtype))
    return stream.clamp(-clip, clip) * action_mask


def gae(rewards, values, action_mask, gamma: float, lam: float):
    """Generalised advantage estimation over the response, V = 0 after its last token:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns G_t = A_t + V_t."""
    values = values * action_mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    L = rewards.shape[1]
    for t in reversed(range(L)):
        next_value = values[:, t + 1] if t + 1 < L else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * action_mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def actor_loss(logp, old_logp, advantages, action_mask, clip_eps: float):
    """PPO's clipped surrogate, per sequence [B]: -mean_t min(rho A, clip(rho, 1-eps, 1+eps) A)."""
    # Zero the log-ratio off the answer (prompt, padding) so no exp() there can overflow into inf * 0.
    ratio = torch.exp(torch.where(action_mask.bool(), logp - old_logp, 0.0))
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return -per_sequence_mean(surrogate, action_mask), per_sequence_mean(clipped, action_mask)


def critic_loss(values, old_values, returns, action_mask, clip_range: float):
    """Clipped value loss, per sequence [B]: 0.5 mean_t max((V - G)^2, (clip(V, V_old +- eps) - G)^2)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss = torch.maximum((values - returns).square(), (clipped_values - returns).square())
    clipped = ((values - old_values).abs() > clip_range).float()
    return 0.5 * per_sequence_mean(loss, action_mask), per_sequence_mean(clipped, action_mask)


def lambda_update(log_lambda, optimizer, mean_cost: float, threshold: float, lambda_max: float):
    """One SGD step on loss = -(J_C - threshold) exp(log lambda):
    log lambda <- log lambda + lr lambda (J_C - threshold); then log lambda <= log lambda_max."""
    optimizer.zero_grad()
    loss = -(mean_cost - threshold) * log_lambda.exp()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        log_lambda.clamp_(max=math.log(lambda_max))
    return float(loss.detach())


def explained_variance(values, returns, mask, all_reduce_sum=lambda t: t):
    """1 - Var(G - V) / Var(G) over the response tokens (of every rank, through all_reduce_sum):
    1 is a perfect critic, 0 a constant one."""
    m = mask.bool()
    v, g = values[m].double(), returns[m].double()
    n = torch.tensor(float(m.sum()), dtype=torch.float64)
    moments = torch.stack([n, g.sum(), (g * g).sum(), (g - v).sum(), ((g - v) ** 2).sum()])
    n, sum_g, sum_g2, sum_e, sum_e2 = all_reduce_sum(moments).tolist()
    if n < 2:
        return float("nan")
    return 1 - (sum_e2 - sum_e**2 / n) / max(sum_g2 - sum_g**2 / n, 1e-12)  # the 1/(n-1) factors cancel


# ---------------------------------------------------------------------------------------------
# The Lagrange multiplier: one object (window, delay, the same value on every rank, state), and
# its update rule as a small class. A new rule is one more subclass of LambdaRule: its `name`
# becomes a --lambda-update choice and its `add_args` flags appear in --help.


class LambdaRule:
    """How lambda moves given the constraint's current value. Subclasses set `name`, and define
    `value`, `step(mean_cost, threshold)`, `state_dict()` / `load_state_dict()`."""
    name: str | None = None  # the --lambda-update choice; None: not offered on the command line
    registry: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            LambdaRule.registry[cls.name] = cls

    @classmethod
    def add_args(cls, parser):
        """The rule's own flags."""

    def metrics(self) -> dict:
        """The rule's internals for log.jsonl, beyond lambda itself."""
        return {}


class SGDOnLogLambda(LambdaRule):
    """The authors' rule (lambda_update above): lambda = exp(log lambda), one SGD step of
    --lambda-lr on log lambda per iteration, log lambda <= log --lambda-max. lambda moves by a
    factor per step, fast when large and slowly when small, and overshoots the boundary."""
    name = "sgd"

    def __init__(self, args):
        self.log_lambda = torch.nn.Parameter(torch.tensor(math.log(max(args.lambda_init, 1e-8)), dtype=torch.float64))
        self.optimizer = torch.optim.SGD([self.log_lambda], lr=args.lambda_lr)
        self.lambda_max = args.lambda_max

    @property
    def value(self) -> float:
        return float(self.log_lambda.detach().exp())

    def step(self, mean_cost: float, threshold: float):
        lambda_update(self.log_lambda, self.optimizer, mean_cost, threshold, self.lambda_max)

    def state_dict(self) -> dict:
        return {"log_lambda": float(self.log_lambda.detach())}

    def load_state_dict(self, state: dict):
        self.log_lambda.data.fill_(state["log_lambda"])


class PIDLambda(LambdaRule):
    """The PID Lagrangian of Stooke, Achiam & Abbeel 2020 ("Responsive Safety in Reinforcement
    Learning by PID Lagrangian Methods", Algorithm 2, with their smoothing), on the constraint
    error e = J_C - threshold:

        I <- clamp(I + Ki e, 0, lambda_max)            integral, clamped: no wind-up below 0 or past the cap
        P <- a_p P + (1 - a_p) e                        proportional term on a smoothed error
        S <- a_d S + (1 - a_d) J_C                      smoothed cost for the derivative
        D  = max(0, S - S from d iterations ago)        derivative, only while the cost rises
        lambda = clamp(Kp P + I + Kd D, 0, lambda_max)

    The integral starts at --lambda-init, so lambda starts where the SGD rule's does. Unlike
    SGD on log lambda, the P term pulls lambda down as soon as the constraint holds, instead of
    after the integral has unwound: less overshoot. S starts at the first J_C (no spurious
    derivative at the start)."""
    name = "pid"

    @classmethod
    def add_args(cls, parser):
        a = parser.add_argument
        a("--pid-kp", type=cli.non_negative, default=1.0, help="PID lambda: proportional gain Kp")
        a("--pid-ki", type=cli.non_negative, default=0.5, help="PID lambda: integral gain Ki (per iteration)")
        a("--pid-kd", type=cli.non_negative, default=1.0, help="PID lambda: derivative gain Kd")
        a("--pid-d-delay", type=cli.positive(int), default=4, help="PID lambda: iterations the derivative spans")
        a("--pid-p-ema", type=cli.fraction, default=0.0, help="PID lambda: EMA factor a_p of the proportional error (0: none)")
        a("--pid-d-ema", type=cli.fraction, default=0.5, help="PID lambda: EMA factor a_d of the cost for the derivative")

    def __init__(self, args):
        self.kp, self.ki, self.kd = args.pid_kp, args.pid_ki, args.pid_kd
        self.a_p, self.a_d, self.lambda_max = args.pid_p_ema, args.pid_d_ema, args.lambda_max
        self.integral, self.p_error, self.derivative = min(args.lambda_init, args.lambda_max), 0.0, 0.0
        self.smoothed_costs = deque(maxlen=args.pid_d_delay + 1)  # S now and d iterations ago
        self.lam = self.integral

    @property
    def value(self) -> float:
        return self.lam

    def step(self, mean_cost: float, threshold: float):
        error = mean_cost - threshold
        self.integral = min(max(self.integral + self.ki * error, 0.0), self.lambda_max)
        self.p_error = self.a_p * self.p_error + (1 - self.a_p) * error
        previous = self.smoothed_costs[-1] if self.smoothed_costs else mean_cost
        self.smoothed_costs.append(self.a_d * previous + (1 - self.a_d) * mean_cost)
        self.derivative = max(0.0, self.smoothed_costs[-1] - self.smoothed_costs[0])
        self.lam = min(max(self.kp * self.p_error + self.integral + self.kd * self.derivative, 0.0), self.lambda_max)

    def state_dict(self) -> dict:
        return {"integral": self.integral, "p_error": self.p_error, "derivative": self.derivative,
                "smoothed_costs": list(self.smoothed_costs), "lambda": self.lam}

    def load_state_dict(self, state: dict):
        self.integral, self.p_error, self.derivative = state["integral"], state["p_error"], state["derivative"]
        self.smoothed_costs.clear()
        self.smoothed_costs.extend(state["smoothed_costs"])
        self.lam = state["lambda"]

    def metrics(self) -> dict:
        return {"pid_p": self.kp * self.p_error, "pid_i": self.integral, "pid_d": self.kd * self.derivative}


class FixedLambda(LambdaRule):
    """lambda never moves: reward shaping's fixed lambda (--lambda-init), or 0 for plain PPO."""

    def __init__(self, value: float):
        self.fixed = value

    @property
    def value(self) -> float:
        return self.fixed

    def step(self, mean_cost: float, threshold: float):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class LagrangeMultiplier:
    """lambda >= 0 and what it is computed from: J_C, the mean cost of the last `window` episodes
    of every rank (gathered in rank order, so every rank holds the same numbers), moved by `rule`
    once per iteration after the first `delay` iterations. Rank 0's state is broadcast after each
    update, so lambda is the same on every rank even across nondeterministic reductions."""

    def __init__(self, rule: LambdaRule, threshold: float, window: int, delay: int, d):
        self.rule, self.threshold, self.delay, self.d = rule, threshold, delay, d
        self.window = deque(maxlen=window)
        self.iterations = 0
        self.mean_cost = float("nan")

    @property
    def value(self) -> float:
        return self.rule.value

    def update(self, episode_costs: torch.Tensor):
        """episode_costs: this rank's costs of the iteration's episodes. Every rank calls this."""
        self.window.extend(self.d.all_gather_cat(episode_costs.cpu().double()).tolist())
        self.iterations += 1
        self.mean_cost = sum(self.window) / len(self.window)
        if self.iterations > self.delay:
            self.rule.step(self.mean_cost, self.threshold)
        if self.d.distributed:
            state = [self.rule.state_dict()]
            dist.broadcast_object_list(state, src=0)
            self.rule.load_state_dict(state[0])

    def metrics(self) -> dict:
        return {"lambda": self.value, "mean_episode_cost": self.mean_cost,
                "constraint_violation": self.mean_cost - self.threshold,  # J_C - threshold: > 0 means too costly
                **self.rule.metrics()}

    def state_dict(self) -> dict:
        return {"rule": self.rule.state_dict(), "window": list(self.window), "iterations": self.iterations,
                "mean_cost": self.mean_cost}

    def load_state_dict(self, state: dict):
        self.rule.load_state_dict(state["rule"])
        self.window.clear()
        self.window.extend(state["window"])
        self.iterations, self.mean_cost = state["iterations"], state["mean_cost"]


def make_multiplier(args, d) -> LagrangeMultiplier:
    if args.algo == "ppo_lag":
        rule = LambdaRule.registry[args.lambda_update](args)
    else:  # reward shaping's lambda is a constant; plain PPO has none
        rule = FixedLambda(args.lambda_init if args.algo == "reward_shaping" else 0.0)
    return LagrangeMultiplier(rule, args.threshold, args.episode_cost_window, args.lambda_update_delay, d)


# ---------------------------------------------------------------------------------------------
# Experience


@dataclass
class Rollout:
    """One micro-batch of experience: everything the update reads. rollout() fills the first
    fields, advantages() the advantages and returns."""
    sequences: torch.Tensor  # [B, L] prompt (left-padded) + answer + EOS + pads
    attention_mask: torch.Tensor  # [B, L]
    action_mask: torch.Tensor  # [B, L-1]
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    reward: torch.Tensor  # [B] reward model end score (minus the truncation penalty)
    cost: torch.Tensor  # [B] cost model end score (zeros if there is no cost model)
    old_logp: torch.Tensor  # [B, L-1] actor log-probs at sampling time
    ref_logp: torch.Tensor  # [B, L-1]
    reward_values: torch.Tensor  # [B, L-1]
    cost_values: torch.Tensor | None  # [B, L-1] (ppo_lag only)
    reward_advantages: torch.Tensor | None = None
    reward_returns: torch.Tensor | None = None
    cost_advantages: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None

    @property
    def kl(self) -> torch.Tensor:
        """k1 estimate of KL(actor || reference) per action, [B, L-1]."""
        return (self.old_logp - self.ref_logp) * self.action_mask


@dataclass
class Models:
    """The six models of PPO-Lagrangian (cost model and cost critic None where the algorithm has none)."""
    actor: Transformer
    reference: Transformer
    reward_model: Transformer
    cost_model: Transformer | None
    reward_critic: Transformer
    cost_critic: Transformer | None
    optimizers: dict  # name of a trained model -> (optimizer, scheduler)

    def trained(self) -> dict:
        """name -> (model, optimizer, scheduler): what a checkpoint holds."""
        return {name: (getattr(self, name), *pair) for name, pair in self.optimizers.items()}


def logprobs(model, seq, mask, d, entropy=False):
    """Log-probs [B, L-1] of each next token (and the entropy, if asked)."""
    with training.autocast(d):
        return model(seq[:, :-1], mask[:, :-1], targets=seq[:, 1:], return_entropy=entropy)


def values_of(critic, seq, mask, d):
    """A critic's value at every position that predicts a token, [B, L-1]."""
    with training.autocast(d):
        return critic(seq, mask)[:, :-1].float()


@torch.no_grad()
def rollout(step: int, models: Models, prompt_set: list, args, d, tok) -> tuple[list[Rollout], dict]:
    """Sample, score and evaluate this rank's share of iteration `step`'s prompts. Returns the
    rollouts and the time spent generating and scoring."""
    actor = models.actor
    actor.eval()
    chunks = training.batches_for_step(step - 1, len(prompt_set), args.batch_size, args.micro_batch_size, d, args.seed)
    samples, t0 = [], time.time()
    with training.gathered(actor):  # one all-gather per block for the whole generation
        for k, idx in enumerate(chunks):
            batch = collate_prompts([prompt_set[i] for i in idx], pad_id=tok.pad_id)
            prompt_ids, prompt_mask = batch["input_ids"].to(d.device), batch["attention_mask"].to(d.device)
            # The same noise for a prompt whatever the number of ranks: seeded by step, drawn for
            # the whole global batch, sliced at this chunk's rows.
            g = torch.Generator(device=d.device).manual_seed(args.seed * 1_000_003 + step)
            with training.autocast(d):
                seq = actor.generate(prompt_ids, prompt_mask, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_p=args.top_p, eos_id=tok.eos_ids,
                                     pad_id=tok.pad_id, generator=g,
                                     noise_rows=((d.rank + k * d.world) * args.micro_batch_size, args.batch_size),
                                     decode=args.decode)
            mask = generation_mask(seq, prompt_mask, tok.eos_ids)
            width = int(mask.sum(0).nonzero().max()) + 1  # drop columns that are padding in every row
            seq, mask = seq[:, :width], mask[:, :width]
            action_mask = mask[:, 1:].clone()
            action_mask[:, :prompt_ids.shape[1] - 1] = 0
            truncated = ~is_eos(seq[:, prompt_ids.shape[1]:], tok.eos_ids).any(-1)
            samples.append((seq, mask, action_mask.float(), truncated))
    t_generate = time.time() - t0

    t0 = time.time()
    rollouts = []
    for seq, mask, action_mask, truncated in samples:
        with training.autocast(d):
            reward = batch_end_scores(models.reward_model, seq, mask).float()
            cost = batch_end_scores(models.cost_model, seq, mask).float() if models.cost_model else torch.zeros_like(reward)
        rollouts.append(Rollout(
            sequences=seq, attention_mask=mask, action_mask=action_mask, truncated=truncated,
            reward=reward - args.truncation_penalty * truncated.float(), cost=cost,
            old_logp=logprobs(actor, seq, mask, d).float(), ref_logp=logprobs(models.reference, seq, mask, d).float(),
            reward_values=values_of(models.reward_critic, seq, mask, d),
            cost_values=values_of(models.cost_critic, seq, mask, d) if models.cost_critic else None))
    actor.train()
    return rollouts, {"time_generate": t_generate, "time_score": time.time() - t0}


def advantages(rollouts: list[Rollout], lam: float, args):
    """Fill each rollout's advantages and returns: the reward stream r_t = -beta kl_t (+ R at the
    end; R - lambda C under reward shaping) and, for PPO-Lagrangian, the cost stream
    c_t = +beta kl_t (+ C at the end), each through GAE with its own critic's values."""
    for r in rollouts:
        end_reward = r.reward - lam * r.cost if args.algo == "reward_shaping" else r.reward
        reward_stream = token_rewards(r.kl, end_reward, r.action_mask, args.kl_coeff, args.clip_range_score, -1.0)
        r.reward_advantages, r.reward_returns = gae(reward_stream, r.reward_values, r.action_mask, args.gamma,
                                                    args.gae_lambda)
        if args.algo == "ppo_lag":
            cost_stream = token_rewards(r.kl, r.cost, r.action_mask, args.kl_coeff, args.clip_range_score, +1.0)
            r.cost_advantages, r.cost_returns = gae(cost_stream, r.cost_values, r.action_mask, args.gamma,
                                                    args.gae_lambda)


# ---------------------------------------------------------------------------------------------
# The update


def actor_rl_loss(r: Rollout, actor, lam: float, scale: float, args, d):
    """PPO's clipped loss on the combined advantage (A_R - lambda A_C) / (1 + lambda), summed over
    the batch's sequences (the trainer divides by the global batch size)."""
    logp, entropy = logprobs(actor, r.sequences, r.attention_mask, d, entropy=True)
    if args.algo == "ppo_lag":
        combined = (r.reward_advantages - lam * r.cost_advantages) / (1 + lam)
    else:
        combined = r.reward_advantages
    loss, clip_frac = actor_loss(logp.float(), r.old_logp, combined, r.action_mask, args.clip_eps)
    loss = loss.sum()
    return loss * scale, {"actor_loss": float(loss.detach()), "actor_clip": float(clip_frac.sum()),
                          "entropy": float(per_sequence_mean(entropy.detach().float(), r.action_mask).sum())}


def actor_ptx_loss(batch: dict, actor, scale: float, ptx_tokens: float, args, d):
    """ptx_coeff x the SFT loss, a token mean over the global PTX batch, in units of the trainer's
    per-sequence denominator."""
    with training.autocast(d):
        nll, _ = training.sft_nll(actor, batch, d.device)
    per_sequence_units = args.batch_size / ptx_tokens
    return args.ptx_coeff * nll * per_sequence_units * scale, {"ptx_loss": float(nll.detach()) * per_sequence_units}


def critic_value_loss(r: Rollout, critic, which: str, args, d):
    """The clipped value loss of the reward or cost critic, summed over the batch's sequences."""
    values = values_of(critic, r.sequences, r.attention_mask, d)
    old, returns = getattr(r, f"{which}_values"), getattr(r, f"{which}_returns")
    loss, clip_frac = critic_loss(values, old, returns, r.action_mask, args.clip_range_value)
    return loss.sum(), {f"{which}_critic_loss": float(loss.sum().detach()), f"{which}_value_clip": float(clip_frac.sum())}


def ppo_update(step: int, rollouts: list[Rollout], models: Models, ptx_set, lam: float, args, d, tok) -> dict:
    """--ppo-epochs optimiser steps of the actor and of each critic on this iteration's rollouts.

    The actor's micro-batches are the rollouts, then (with PTX) SFT batches, each its own forward
    and backward, so the PTX graph never sits in memory beside the RL one; the gradients add up
    as they would for the summed loss. With PTX both halves are halved, as in the authors' code
    (they double the gradient accumulation steps, so each backward is averaged over the RL and
    the PTX pass): gradient clipping then sees their gradient scale."""
    actor_batches = [("rl", r) for r in rollouts]
    ptx_tokens, scale = 1.0, 1.0
    if ptx_set is not None:
        idx = training.batches_for_step(step - 1, len(ptx_set), args.batch_size, args.micro_batch_size, d, args.seed + 1)
        ptx_batches = [collate_sft([ptx_set[i] for i in m], pad_id=tok.pad_id) for m in idx]
        ptx_tokens = float(d.all_reduce_sum(sum(int(b["loss_mask"][:, 1:].sum()) for b in ptx_batches)))
        actor_batches += [("ptx", b) for b in ptx_batches]
        scale = 0.5

    def actor_micro_batch_loss(item):
        kind, batch = item
        if kind == "ptx":
            return actor_ptx_loss(batch, models.actor, scale, ptx_tokens, args, d)
        return actor_rl_loss(batch, models.actor, lam, scale, args, d)

    stats = {}
    for _ in range(args.ppo_epochs):
        _, sums, grad_norm, lr = training.train_step(models.actor, *models.optimizers["actor"], actor_batches,
                                                     actor_micro_batch_loss, args.batch_size, d, args.grad_clip)
        stats.update({k: v / args.batch_size for k, v in sums.items()}, actor_grad_norm=grad_norm, lr=lr)
        for which in ("reward", "cost"):
            critic = getattr(models, f"{which}_critic")
            if critic is not None:
                _, sums, _, _ = training.train_step(critic, *models.optimizers[f"{which}_critic"], rollouts,
                                                    partial(critic_value_loss, critic=critic, which=which, args=args, d=d),
                                                    args.batch_size, d, args.grad_clip)
                stats.update({k: v / args.batch_size for k, v in sums.items()})
    return stats


def diagnostics(rollouts: list[Rollout], args, d, tok, judge=None) -> dict:
    """Per-iteration means over the global batch (every rank sums; one all-reduce each), the
    critics' explained variance and, on the synthetic task, the ground truth of the answers."""
    def total(fn):
        return float(d.all_reduce_sum(sum(float(fn(r)) for r in rollouts)))

    def ev(which):
        return explained_variance(torch.cat([getattr(r, f"{which}_values").flatten() for r in rollouts]),
                                  torch.cat([getattr(r, f"{which}_returns").flatten() for r in rollouts]),
                                  torch.cat([r.action_mask.flatten() for r in rollouts]), d.all_reduce_sum)

    n = args.batch_size
    metrics = {
        "reward": total(lambda r: r.reward.sum()) / n,
        "cost": total(lambda r: r.cost.sum()) / n,
        "cost_positive_share": total(lambda r: (r.cost > 0).sum()) / n,
        "kl": total(lambda r: r.kl.sum()) / n,  # per answer, summed over its tokens
        "response_length": total(lambda r: r.action_mask.sum()) / n,
        "truncated_share": total(lambda r: r.truncated.sum()) / n,
        "reward_value_ev": ev("reward"),
    }
    if args.algo == "ppo_lag":
        metrics["cost_value_ev"] = ev("cost")
    if judge is not None:  # ground truth of the synthetic task: diagnostics only, the learner never sees it
        verdicts = []
        for r in rollouts:
            start = int((r.action_mask.sum(0) == 0).cumprod(0).sum()) + 1  # first response column
            for seq, real in zip(r.sequences, r.attention_mask.bool()):  # the mask, not pad ids: pad may be an EOS
                verdicts.append(judge(tok.decode(seq[:start][real[:start]], stop_at_eos=False),
                                      tok.decode(seq[start:][real[start:]])))
        tallies = judge_tallies((v["prompt_harmful"], v) for v in verdicts)
        summed = d.all_reduce_sum([tallies[k] for k in TALLIES]).tolist()  # over the whole batch: one all-reduce
        rates = judge_rates(dict(zip(TALLIES, summed)))
        metrics["true_harmful_rate"], metrics["true_helpfulness"] = rates["harmful_rate"], rates["helpfulness"]
    return metrics


def report_initial_costs(rollouts: list[Rollout], args, d):
    """The cost model's quantiles on the initial policy's answers, to check the threshold's scale."""
    costs = d.all_gather_cat(torch.cat([r.cost for r in rollouts]).cpu().double())
    if not d.is_main or args.cost_model.lower() == "none":
        return
    q = torch.quantile(costs, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    d.print("cost model on the initial policy's answers: quantiles 5/25/50/75/95% = "
            + " / ".join(f"{v:.2f}" for v in q.tolist()) + f"; mean {float(costs.mean()):.2f}; threshold {args.threshold}")
    if args.algo == "ppo_lag" and not q[0] <= args.threshold <= q[-1]:
        d.print(f"warning: the threshold {args.threshold} lies outside the 5-95% range of these costs: lambda will "
                f"only {'grow' if args.threshold < q[0] else 'shrink'}; see README, 'Choosing the threshold'")


# ---------------------------------------------------------------------------------------------
# Setup: flags, data, models


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    a = parser.add_argument
    a("--algo", choices=["ppo_lag", "ppo", "reward_shaping"], default="ppo_lag",
      help="ppo_lag: constrained (learned lambda); ppo: reward only; reward_shaping: fixed lambda, reward R - lambda C")
    a("--actor", default="out/sft/model", help="policy to fine-tune (the SFT model); also the frozen reference")
    a("--reference", default=None, help="the frozen KL reference, when it is not --actor (rounds.py --reference sft)")
    a("--reward-model", default="out/reward_model/model", help="frozen reward model; the reward critic starts from it")
    a("--cost-model", default="out/cost_model/model", help="frozen cost model; the cost critic starts from it ('none' for --algo ppo)")
    a("--prompts", default=None, help="prompt files 'path[:fraction|:count],...' with a 'prompt' field; default: the synthetic task's")
    a("--ptx-data", default=None, help="SFT files for the PTX loss (default: the synthetic SFT data when --ptx-coeff > 0)")
    a("--critic-lr", type=cli.positive(float), default=None, help="critics' learning rate (constant after warmup)")
    a("--max-new-tokens", type=cli.positive(int), default=None, help="answer length limit; answers cut there without EOS are counted")
    # The KL and the PPO ratio score the policy at temperature 1 over the whole vocabulary, as the authors'
    # code does: other values sample from another distribution than the one PPO corrects for.
    a("--temperature", type=cli.non_negative, default=1.0, help="sampling temperature of rollouts (the log-probs "
      "of the KL and PPO ratio stay at temperature 1: other values make the rollouts off-policy)")
    a("--top-p", type=cli.probability, default=1.0, help="nucleus sampling mass of rollouts (off-policy below 1, "
      "as --temperature)")
    a("--decode", choices=DECODE_MODES, default="auto", help="rollout decoding step (model.generate): auto = a "
      "captured CUDA graph on GPUs, the eager step on CPUs; the same tokens in fp32, bf16 may round differently")
    a("--kl-coeff", type=cli.non_negative, default=None, help="beta: weight of the per-token KL(actor || reference) penalty")
    a("--clip-eps", type=cli.positive(float), default=0.2, help="PPO ratio clip")
    a("--clip-range-score", type=cli.positive(float), default=50.0, help="per-token rewards and costs are clipped to +-this")
    a("--clip-range-value", type=cli.positive(float), default=5.0, help="value clip around the rollout-time values")
    a("--gamma", type=cli.unit_interval, default=1.0, help="discount")
    a("--gae-lambda", type=cli.unit_interval, default=0.95, help="GAE lambda")
    a("--ppo-epochs", type=cli.positive(int), default=1, help="PPO updates per rollout batch")
    a("--ptx-coeff", type=cli.non_negative, default=None, help="weight of the SFT (PTX) loss added to the actor's")
    a("--threshold", type=cli.finite, default=None, help="cost limit: J_C <= threshold (on the cost model's scale; see the quantiles printed at start)")
    a("--lambda-update", choices=list(LambdaRule.registry), default="sgd",
      help="how lambda moves: sgd (the authors': SGD on log lambda) or pid (Stooke et al. 2020)")
    a("--lambda-init", type=cli.positive(float), default=1.0, help="initial lambda, above 0 (reward_shaping: the fixed lambda)")
    a("--lambda-lr", type=cli.positive(float), default=0.1, help="sgd: step size on log lambda")
    a("--lambda-max", type=cli.positive(float), default=5.0, help="upper clamp of lambda")
    a("--lambda-update-delay", type=cli.non_negative_int, default=0, help="iterations before lambda starts to move")
    a("--episode-cost-window", type=cli.positive(int), default=None, help="J_C is the mean cost of this many most recent episodes (all ranks)")
    for rule in LambdaRule.registry.values():
        rule.add_args(parser)
    a("--truncation-penalty", type=cli.finite, default=0.0, help="subtracted from the reward of answers cut without EOS (their end score is read off-distribution)")
    a("--offload-frozen", action="store_true", help="keep the frozen reference/reward/cost models' shards in CPU memory")
    cli.add_common_args(parser, out=None,
                        max_length="prompt tokens, template included (longer prompts are dropped, and counted); a "
                                   "PTX dialogue may have --max-new-tokens more",
                        eval_every=argparse.SUPPRESS)  # accepted, unused: no eval set (evaluate.py scores the actor)
    cli.show_recipes(parser, TINY, AUTHORS, notes={"kl_coeff": f"--algo ppo/reward_shaping: {AUTHORS_BASELINE_KL_COEFF}"})
    args = parser.parse_args(argv)
    authors = {**AUTHORS, **({} if args.algo == "ppo_lag" else {"kl_coeff": AUTHORS_BASELINE_KL_COEFF})}
    cli.apply_recipe(args, {"tiny": TINY, "authors": authors}, data_given=args.prompts is not None)
    args.out = args.out or f"out/{args.algo}"
    if args.algo != "ppo" and args.cost_model.lower() == "none":
        parser.error(f"--algo {args.algo} needs --cost-model")
    cli.check_out_dir(args.out)
    return args


ALGO_NAMES = {"ppo_lag": "a PPO-Lagrangian run", "ppo": "a PPO run", "reward_shaping": "a reward-shaping run"}


@dataclass
class PPOData:
    tok: Tokenizer
    prompts: list  # tokenized prompts
    ptx: list | None  # tokenized SFT dialogues for the PTX loss
    judge: object | None  # the synthetic task's ground truth (diagnostics only)


def load_data(args, d) -> PPOData:
    judge = None
    if args.prompts is None:
        task = training.synthetic_task(args, d)
        prompt_spec, synthetic_tokenizer = task.ppo_prompts, task.tokenizer
        ptx_spec = args.ptx_data or task.sft_train
        from data.judge import judge
    else:
        prompt_spec, synthetic_tokenizer, ptx_spec = args.prompts, None, args.ptx_data
    training.fetch_datasets(d, prompt_spec, ptx_spec if args.ptx_coeff > 0 else None)  # Hub data sets -> the HF cache
    tok = training.load_tokenizer(args, args.actor, synthetic_tokenizer, d, args.reward_model, args.cost_model,
                                  args.reference)
    prompts, _ = load_prompts(prompt_spec, seed=args.seed, log=d.print)
    prompt_set, _ = tokenize_prompts(tok, prompts, args.max_length, log=d.print, template=args.template)
    training.require_examples(prompt_set, "prompts", args.batch_size, d.print)
    ptx_set = None
    if args.ptx_coeff > 0:
        if ptx_spec is None:
            raise ValueError(f"--ptx-coeff {args.ptx_coeff} (the authors' recipe on real data) needs --ptx-data "
                             "(SFT files, e.g. sft.py's --data), or pass --ptx-coeff 0")
        ptx_set, _ = tokenize_sft(tok, load_sft(ptx_spec, seed=args.seed, log=d.print)[0],
                                  args.max_length + args.max_new_tokens, log=d.print, template=args.template)
        training.require_examples(ptx_set, "PTX dialogues")
    return PPOData(tok, prompt_set, ptx_set, judge)


def load_models(args, d, tok, total_steps: int) -> Models:
    """Actor and reference from --actor (the reference from --reference if given), reward model and reward critic from --reward-model,
    cost model and cost critic from --cost-model; optimisers for the three trained ones."""
    load = partial(training.load_model, d=d, seed=args.seed)
    frozen = dict(trainable=False, cpu_offload=args.offload_frozen)
    trained = dict(activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload)
    use_cost_model = args.cost_model.lower() != "none"
    actor = load(args.actor, "lm", **trained)
    reference = load(args.reference or args.actor, "lm", **frozen)
    reward_model = load(args.reward_model, "score", **frozen)
    cost_model = load(args.cost_model, "score", **frozen) if use_cost_model else None
    reward_critic = load(args.reward_model, "score", **trained)
    cost_critic = load(args.cost_model, "score", **trained) if args.algo == "ppo_lag" else None
    for model, path in ((actor, args.actor), (reference, args.reference or args.actor),
                        (reward_model, args.reward_model), (cost_model, args.cost_model)):
        if model is not None:
            training.check_vocab(model, tok, path)
    warmup = int(args.warmup_ratio * total_steps)
    optimizers = {"actor": training.build_optimizer(actor, args.lr, args.weight_decay, warmup_steps=warmup,
                                                    total_steps=total_steps)}
    for name, critic in (("reward_critic", reward_critic), ("cost_critic", cost_critic)):
        if critic is not None:
            optimizers[name] = training.build_optimizer(critic, args.critic_lr, 0.0, warmup_steps=warmup,
                                                        total_steps=total_steps, schedule="constant")
    return Models(actor, reference, reward_model, cost_model, reward_critic, cost_critic, optimizers)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    # -- arguments and setup ----------------------------------------------------------------------
    args = parse_args(argv)
    d = training.setup_distributed(args.device, args.precision)
    training.seed_everything(args.seed)
    training.resolve_models(args, d, "actor", "reward_model", "cost_model", "reference")  # Hub ids -> their folders in the HF cache
    # unset: the template the models were trained with (all the same one)
    args.template = training.resolve_template(args.template, args.actor, args.reward_model, args.cost_model, args.reference)
    d.print(f"ppo_lag ({args.algo}): {d.world} rank(s) on {d.device}; recipe {args.recipe}; "
            + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    ckpt = Checkpointer(args.out, d, args=args, run=f"{ALGO_NAMES[args.algo]} (ppo_lag.py --algo {args.algo})")
    ckpt.check()  # another run's --out, other flags: said before anything loads
    training.check_models(policies=[args.actor, args.reference], reward=args.reward_model, cost=args.cost_model)

    # -- data -------------------------------------------------------------------------------------
    data = load_data(args, d)
    ckpt.check_data(prompts=data.prompts, ptx=data.ptx)  # a resume reads the data its checkpoint was trained on
    total_steps = args.max_steps or training.steps_for_epochs(len(data.prompts), args.batch_size, args.epochs)

    # -- models, lambda, resume -------------------------------------------------------------------
    models = load_models(args, d, data.tok, total_steps)
    multiplier = make_multiplier(args, d)
    start_step, state = ckpt.resume(models.trained())
    if state:
        multiplier.load_state_dict(state["multiplier"])
    d.print(f"actor: {models.actor.num_params() / 1e6:.2f}M parameters; {total_steps} iterations "
            f"of {args.batch_size} prompts; {len(data.prompts)} prompts")
    logger = training.Logger(args.out, d, total_steps, args.algo, resume_step=start_step,
                             report_to=args.report_to, config=vars(args))

    # -- training loop: one iteration = one log line ----------------------------------------------
    for step in range(start_step + 1, total_steps + 1):
        t_start = time.time()
        rollouts, timings = rollout(step, models, data.prompts, args, d, data.tok)
        multiplier.update(torch.cat([r.cost for r in rollouts]))  # before the actor update, as the authors'
        if step == 1:
            report_initial_costs(rollouts, args, d)
        advantages(rollouts, multiplier.value, args)
        t0 = time.time()
        learned = ppo_update(step, rollouts, models, data.ptx, multiplier.value, args, d, data.tok)
        timings["time_learn"] = time.time() - t0

        metrics = {**diagnostics(rollouts, args, d, data.tok, data.judge), **multiplier.metrics(), **learned,
                   **timings, "samples_per_s": args.batch_size / (time.time() - t_start)}
        summary = (f"R {metrics['reward']:+.2f} C {metrics['cost']:+.2f} lambda {metrics['lambda']:.2f} "
                   f"KL {metrics['kl']:.2f}")
        if data.judge is not None:
            summary += f" | harmful {metrics['true_harmful_rate']:.2f} helpful {metrics['true_helpfulness']:.2f}"
        logger.log(step, metrics, summary)
        if step % args.save_every == 0 or step == total_steps:
            ckpt.save(step, models.trained(), {"multiplier": multiplier.state_dict(),
                                               "prompts_seen": step * args.batch_size})
    logger.close()

    # -- save: the aligned policy -----------------------------------------------------------------
    final = training.save_final(models.actor, args.out, d, data.tok, args, name="actor")
    d.print(f"ppo_lag ({args.algo}): {'already complete' if start_step >= total_steps else 'done'}; actor in {final}"
            + (f"; lambda {multiplier.value:.3f}" if args.algo == "ppo_lag" else ""))
    training.teardown_distributed(d)


if __name__ == "__main__":
    cli.run(main)
