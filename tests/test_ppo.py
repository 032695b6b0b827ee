"""ppo_lag.py: GAE, the per-token streams, the actor, critic and lambda losses against values
computed by hand; lambda's direction; 2 ranks against 1 process; resume after SIGKILL; each --algo."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import hf_io
import torch

import ppo_lag
import training
from ppo_lag import (LagrangeMultiplier, LambdaRule, PIDLambda, SGDOnLogLambda, actor_loss, critic_loss,
                     explained_variance, gae, lambda_update, per_sequence_mean, token_rewards)

ROOT = Path(__file__).resolve().parent.parent
ONE_PROCESS = training.Dist(0, 1, 0, torch.device("cpu"), None)  # rank 0 of 1
sys.path.insert(0, str(Path(__file__).resolve().parent))
from safetensors.torch import load_file  # noqa: E402
from test_stages import assert_same_weights, log_of, run  # noqa: E402


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.5, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1.0 + 0 - 0.6 = 0.4            A = 0.4
    # t=1: delta = 0.5 + 0.6 - 0.4 = 0.7          A = 0.7 + 0.95 * 0.4 = 1.08
    # t=0: delta = 0.0 + 0.4 - 0.2 = 0.2          A = 0.2 + 0.95 * 1.08 = 1.226
    torch.testing.assert_close(adv, torch.tensor([[1.226, 1.08, 0.4]]))
    torch.testing.assert_close(ret, torch.tensor([[1.426, 1.48, 1.0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # t=1: delta = 0.5 + 0.9 * 0.6 - 0.4 = 0.64   A = 0.64 + 0.855 * 0.4 = 0.982
    # t=0: delta = 0.9 * 0.4 - 0.2 = 0.16         A = 0.16 + 0.855 * 0.982 = 0.99961
    torch.testing.assert_close(adv, torch.tensor([[0.99961, 0.982, 0.4]]))


def test_gae_ignores_prompt_and_padding():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 9.0]])
    values = torch.tensor([[5.0, 1.0, 1.0, 5.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # prompt position, two answer tokens, a pad
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2 (last answer token): V after it is 0: delta = 2 - 1 = 1;  t=1: delta = 1 + 1 - 1 = 1, A = 1 + 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.5, 1.0, 0.0]]))
    torch.testing.assert_close(ret * mask, torch.tensor([[0.0, 2.5, 2.0, 0.0]]))


def test_token_rewards_by_hand():
    kl = torch.tensor([[0.0, 0.1, -0.2, 0.3, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    end = torch.tensor([2.0])
    r = token_rewards(kl, end, mask, kl_coeff=0.5, clip=50.0, kl_sign=-1.0)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 0.1, -0.15 + 2.0, 0.0]]))
    c = token_rewards(kl, end, mask, kl_coeff=0.5, clip=1.0, kl_sign=+1.0)
    torch.testing.assert_close(c, torch.tensor([[0.0, 0.05, -0.1, 1.0, 0.0]]))  # 2.15 clipped to 1


def test_actor_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clip_frac = actor_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    # min(rho A, clip(rho) A): min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(-2.2, -2.2) = -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, rel=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)
    # Per-sequence mean first, then over sequences: a long answer does not outweigh a short one.
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(per_sequence_mean(x, m), torch.tensor([1.0, 3.0]))


def test_critic_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 2.5]]), torch.tensor([[2.0, 2.0]])
    loss, clip_frac = critic_loss(values, old, returns, torch.ones(1, 2), clip_range=0.5)
    # t=0: (1-2)^2 = 1 vs (clip to 0.5 - 2)^2 = 2.25 -> 2.25;  t=1: (3-2)^2 = 1 vs (3.0-2)^2 = 1 -> 1
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def rollout_by_hand(**fields):
    """A Rollout of one answer of two tokens after a prompt position; what advantages() reads."""
    values = dict(sequences=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4),
                  action_mask=torch.tensor([[0.0, 1.0, 1.0]]), truncated=torch.tensor([False]),
                  reward=torch.tensor([2.0]), cost=torch.tensor([-1.0]),
                  old_logp=torch.tensor([[-9.0, -1.0, -2.0]]), ref_logp=torch.tensor([[-1.0, -1.5, -1.0]]),
                  reward_values=torch.zeros(1, 3), cost_values=torch.zeros(1, 3))
    return ppo_lag.Rollout(**{**values, **fields})


def test_kl_and_advantages_by_hand():
    # k1 KL of the sampled tokens, log pi - log pi_ref, only on the answer: (0, -1 + 1.5, -2 + 1) = (0, 0.5, -1)
    r = rollout_by_hand()
    torch.testing.assert_close(r.kl, torch.tensor([[0.0, 0.5, -1.0]]))
    args = SimpleNamespace(algo="ppo_lag", kl_coeff=0.1, clip_range_score=50.0, gamma=1.0, gae_lambda=1.0)
    ppo_lag.advantages([r], 2.0, args)
    # r_t = -0.1 kl_t (+ R = 2 at the end): (0, -0.05, 0.1 + 2); c_t = +0.1 kl_t (+ C = -1): (0, 0.05, -0.1 - 1).
    # V = 0 and gamma = lambda_GAE = 1: advantages (= returns) are the sums of the stream from t on.
    torch.testing.assert_close(r.reward_advantages, torch.tensor([[0.0, 2.05, 2.1]]))
    torch.testing.assert_close(r.reward_returns, torch.tensor([[0.0, 2.05, 2.1]]))
    torch.testing.assert_close(r.cost_advantages, torch.tensor([[0.0, -1.05, -1.1]]))
    torch.testing.assert_close(r.cost_returns, torch.tensor([[0.0, -1.05, -1.1]]))
    # Reward shaping: one stream, the end reward R - lambda C = 2 - 2 (-1) = 4; no cost stream.
    r = rollout_by_hand(cost_values=None)
    ppo_lag.advantages([r], 2.0, SimpleNamespace(**{**vars(args), "algo": "reward_shaping"}))
    torch.testing.assert_close(r.reward_advantages, torch.tensor([[0.0, 4.05, 4.1]]))
    assert r.cost_advantages is None


def tiny_model(seed, head="lm", vocab_size=20):
    from model import ModelArgs, Transformer

    m = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=vocab_size, hidden_dim=32), head=head)
    m.init_weights(std=0.3, seed=seed)
    if head == "score":
        m.reset_score_head(std=1.0, seed=seed)
    return m.eval()


def test_actor_rl_loss_combines_advantages_by_hand():
    actor = tiny_model(0)
    seq = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2]])
    mask = torch.ones(2, 4)
    with torch.no_grad():
        old_logp = ppo_lag.logprobs(actor, seq, mask, ONE_PROCESS).float()  # on-policy: every ratio is 1
    r = ppo_lag.Rollout(sequences=seq, attention_mask=mask, action_mask=torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]),
                        truncated=torch.tensor([False, False]), reward=torch.zeros(2), cost=torch.zeros(2),
                        old_logp=old_logp, ref_logp=old_logp, reward_values=torch.zeros(2, 3), cost_values=torch.zeros(2, 3),
                        reward_advantages=torch.tensor([[9.0, 1.0, 2.0], [9.0, 9.0, -1.0]]),
                        cost_advantages=torch.tensor([[9.0, 0.5, -1.0], [9.0, 9.0, 2.0]]))
    args = SimpleNamespace(algo="ppo_lag", clip_eps=0.2)
    loss, stats = ppo_lag.actor_rl_loss(r, actor, 3.0, 0.5, args, ONE_PROCESS)
    # (A_R - 3 A_C) / 4 on the answer tokens: row 0 (1 - 1.5) / 4 = -0.125, (2 + 3) / 4 = 1.25, mean 0.5625;
    # row 1 (-1 - 6) / 4 = -1.75. Loss: minus the sum over rows of the per-row means.
    assert stats["actor_loss"] == pytest.approx(-(0.5625 - 1.75), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * -(0.5625 - 1.75), rel=1e-5)  # times the PTX halving scale
    # plain PPO: the reward advantages alone: row means 1.5 and -1
    _, stats = ppo_lag.actor_rl_loss(r, actor, 3.0, 1.0, SimpleNamespace(algo="ppo", clip_eps=0.2), ONE_PROCESS)
    assert stats["actor_loss"] == pytest.approx(-(1.5 - 1.0), rel=1e-5)


def test_ptx_loss_is_a_token_mean_by_hand():
    """The PTX term, once the trainer divides by --batch-size, is ptx_coeff x the token-mean SFT NLL
    over the global PTX batch (ptx_tokens target tokens), times the halving scale."""
    from data.loaders import TokenizedSFT, collate_sft

    actor = tiny_model(0)
    batch = collate_sft([TokenizedSFT([1, 5, 6, 7, 2], 3), TokenizedSFT([1, 8, 9, 2], 2)], pad_id=0)
    with torch.no_grad():
        logp = torch.log_softmax(actor(batch["input_ids"]).double(), -1)
    # targets: 7 and 2 of row 0 (predicted at 2, 3), 9 and 2 of row 1 (at 1, 2); 10 in the global batch
    nll_sum = -float(logp[0, 2, 7] + logp[0, 3, 2] + logp[1, 1, 9] + logp[1, 2, 2])
    args = SimpleNamespace(batch_size=8, ptx_coeff=0.25)
    loss, stats = ppo_lag.actor_ptx_loss(batch, actor, 0.5, 10.0, args, ONE_PROCESS)
    assert loss.item() / args.batch_size == pytest.approx(0.25 * 0.5 * nll_sum / 10, rel=1e-5)
    assert stats["ptx_loss"] / args.batch_size == pytest.approx(nll_sum / 10, rel=1e-5)  # as ppo_update logs it


def make_lambda(value):
    p = torch.nn.Parameter(torch.tensor(math.log(value), dtype=torch.float64))
    return p, torch.optim.SGD([p], lr=0.1)


def test_explained_variance_by_hand():
    # Response tokens: G = (1, 2, 3, 6), V = (1, 1, 4, 5), so G - V = (0, 1, -1, 1).
    # G: mean 3, squared deviations 4 + 1 + 0 + 9 = 14. G - V: mean 0.25, squared deviations
    # 0.0625 + 0.5625 + 1.5625 + 0.5625 = 2.75. EV = 1 - 2.75 / 14. Masked tokens (99) must not count.
    returns = torch.tensor([[1.0, 2.0, 99.0], [3.0, 6.0, 99.0]])
    values = torch.tensor([[1.0, 1.0, -99.0], [4.0, 5.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - 2.75 / 14, rel=1e-12)
    # Each row alone: (G 1, 2; G - V 0, 1) -> 1 - 0.5 / 0.5 = 0; (G 3, 6; G - V -1, 1) -> 1 - 2 / 4.5.
    assert explained_variance(values[:1], returns[:1], mask[:1]) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(values[1:], returns[1:], mask[1:]) == pytest.approx(1 - 2 / 4.5, rel=1e-12)
    # Two "ranks", one row each, whose moments are summed as all_reduce would: the whole batch's value.
    moments = []
    for rows in (slice(0, 1), slice(1, 2)):
        explained_variance(values[rows], returns[rows], mask[rows], lambda t: moments.append(t) or t)
    total = moments[0] + moments[1]
    assert explained_variance(values[:1], returns[:1], mask[:1], lambda t: total) == pytest.approx(1 - 2.75 / 14, rel=1e-12)


def test_lambda_update_by_hand_and_direction():
    p, opt = make_lambda(1.0)
    lambda_update(p, opt, mean_cost=1.0, threshold=0.5, lambda_max=5.0)
    # log lambda <- 0 + 0.1 * lambda (1) * (1.0 - 0.5) = 0.05
    assert p.item() == pytest.approx(0.05)
    p, opt = make_lambda(2.0)
    lambda_update(p, opt, mean_cost=0.0, threshold=0.5, lambda_max=5.0)
    assert p.item() == pytest.approx(math.log(2.0) - 0.1 * 2.0 * 0.5)
    # rises while too costly, falls while feasible, never above lambda_max
    p, opt = make_lambda(1.0)
    trace = []
    for cost in [3.0] * 20 + [-3.0] * 20:
        lambda_update(p, opt, mean_cost=cost, threshold=0.0, lambda_max=5.0)
        trace.append(p.exp().item())
    assert all(b >= a for a, b in zip(trace[:20], trace[1:20])) and trace[19] == pytest.approx(5.0)
    assert all(b < a for a, b in zip(trace[20:], trace[21:])) and trace[-1] < 0.5


def pid_args(**overrides):
    values = dict(pid_kp=1.0, pid_ki=0.1, pid_kd=2.0, pid_d_delay=2, pid_p_ema=0.5, pid_d_ema=0.5,
                  lambda_init=1.0, lambda_max=5.0, lambda_lr=0.1)
    return SimpleNamespace(**{**values, **overrides})


def test_pid_lambda_by_hand():
    pid = PIDLambda(pid_args())
    assert pid.value == 1.0  # the integral starts at lambda_init
    trace = []
    for cost in (1.0, 2.0, -1.0, 10.0, -100.0):
        pid.step(cost, threshold=0.0)
        trace.append((pid.value, pid.integral))
    # 1: e = 1    I = 1 + 0.1 = 1.1;  P = 0.5 * 0 + 0.5 * 1 = 0.5;  S = 1 (starts at J_C), D = 0
    #             lambda = 0.5 + 1.1 = 1.6
    # 2: e = 2    I = 1.3;  P = 0.25 + 1 = 1.25;  S = 0.5 + 1 = 1.5, D = 1.5 - 1 = 0.5
    #             lambda = 1.25 + 1.3 + 2 * 0.5 = 3.55
    # 3: e = -1   I = 1.2;  P = 0.625 - 0.5 = 0.125;  S = 0.75 - 0.5 = 0.25, D = max(0, 0.25 - 1) = 0
    #             lambda = 0.125 + 1.2 = 1.325
    # 4: e = 10   I = 2.2;  P = 0.0625 + 5 = 5.0625;  S = 0.125 + 5 = 5.125, D = 5.125 - 1.5 (two back)
    #             lambda = 5.0625 + 2.2 + 2 * 3.625 = 14.5125 -> clamped to lambda_max 5
    # 5: e = -100 I = max(0, 2.2 - 10) = 0;  P < 0  ->  lambda = 0
    expected = [(1.6, 1.1), (3.55, 1.3), (1.325, 1.2), (5.0, 2.2), (0.0, 0.0)]
    for (lam, integral), (want_lam, want_integral) in zip(trace, expected, strict=True):
        assert lam == pytest.approx(want_lam, abs=1e-12) and integral == pytest.approx(want_integral, abs=1e-12)
    # The integral never winds up past lambda_max: after a long violation one feasible step brings lambda down.
    pid = PIDLambda(pid_args(pid_kd=0.0, pid_p_ema=0.0))
    for _ in range(200):
        pid.step(3.0, threshold=0.0)
    assert pid.integral == 5.0 and pid.value == 5.0
    pid.step(-0.5, threshold=0.0)
    assert pid.value == pytest.approx(5.0 - 0.05 - 0.5)


def test_lagrange_multiplier_window_delay_and_state():
    one = SimpleNamespace(distributed=False, all_gather_cat=lambda t: t)
    m = LagrangeMultiplier(SGDOnLogLambda(pid_args()), threshold=1.0, window=3, delay=1, d=one)
    m.update(torch.tensor([1.0, 2.0]))  # J_C = 1.5; the first iteration is within the delay
    assert m.value == 1.0 and m.metrics()["constraint_violation"] == pytest.approx(0.5)
    m.update(torch.tensor([3.0, 4.0]))  # window keeps 2, 3, 4: J_C = 3; log lambda <- 0 + 0.1 * 1 * (3 - 1)
    assert m.mean_cost == pytest.approx(3.0) and m.value == pytest.approx(math.exp(0.2))
    # A fresh multiplier given the state continues exactly where this one would.
    state = m.state_dict()
    resumed = LagrangeMultiplier(SGDOnLogLambda(pid_args()), threshold=1.0, window=3, delay=1, d=one)
    resumed.load_state_dict(state)
    for multiplier in (m, resumed):
        multiplier.update(torch.tensor([0.0]))
    assert resumed.value == m.value and resumed.mean_cost == m.mean_cost


def test_a_new_lambda_rule_is_one_class(monkeypatch):
    monkeypatch.setattr(LambdaRule, "registry", dict(LambdaRule.registry))

    class Halving(LambdaRule):  # lambda halves at every update: nothing else needs to change
        name = "halving"

        @classmethod
        def add_args(cls, parser):
            parser.add_argument("--halving-floor", type=float, default=0.25)

        def __init__(self, args):
            self.lam, self.floor = args.lambda_init, args.halving_floor

        value = property(lambda self: self.lam)

        def step(self, mean_cost, threshold):
            self.lam = max(self.lam / 2, self.floor)

        def state_dict(self):
            return {"lam": self.lam}

        def load_state_dict(self, state):
            self.lam = state["lam"]

    args = ppo_lag.parse_args(["--lambda-update", "halving", "--halving-floor", "0.3"])
    multiplier = ppo_lag.make_multiplier(args, SimpleNamespace(distributed=False, all_gather_cat=lambda t: t))
    for _ in range(3):
        multiplier.update(torch.zeros(2))
    assert multiplier.value == 0.3


def test_recipe_kl_coefficients(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    # The authors' scripts: 0.01 for PPO-Lagrangian, 0.02 for the PPO and reward shaping baselines.
    assert ppo_lag.parse_args(["--prompts", str(prompts)]).kl_coeff == 0.01
    assert ppo_lag.parse_args(["--prompts", str(prompts), "--algo", "ppo", "--cost-model", "none"]).kl_coeff == 0.02
    assert ppo_lag.parse_args(["--prompts", str(prompts), "--algo", "reward_shaping"]).kl_coeff == 0.02
    assert ppo_lag.parse_args(["--prompts", str(prompts), "--algo", "ppo", "--kl-coeff", "0.1"]).kl_coeff == 0.1
    assert ppo_lag.parse_args([]).kl_coeff == 0.05  # the tiny recipe
    # Checkpoints: the tiny run (63 iterations) saves every 16, so a killed run loses at most 15
    # iterations, not all of them; the authors' (and sft.py's) every 100; an explicit flag wins.
    assert ppo_lag.parse_args([]).save_every == 16
    assert ppo_lag.parse_args(["--prompts", str(prompts)]).save_every == 100
    assert ppo_lag.parse_args(["--save-every", "3"]).save_every == 3


# ------------------------------------------------------------------------------------------------
# Whole runs on tiny random models (their quality is irrelevant here)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synthetic_data):
    from model import ModelArgs, Transformer

    root = tmp_path_factory.mktemp("ppo")
    task = synthetic_data
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=1024, hidden_dim=64, max_seq_len=128)
    actor = Transformer(args)
    actor.init_weights(seed=0)
    hf_io.save_pretrained(actor, root / "sft", extra_files=[task.tokenizer])
    for i, name in enumerate(["rm", "cm"]):
        score = hf_io.load_pretrained(root / "sft", head="score")
        score.reset_score_head(std=0.5, seed=i)
        hf_io.save_pretrained(score, root / name)
    return SimpleNamespace(root=root, synthetic=task.dir)


def ppo_args(ckpt, out, *extra):
    root = ckpt.root
    return ["--synthetic-dir", str(ckpt.synthetic), "--actor", str(root / "sft"), "--reward-model", str(root / "rm"),
            "--cost-model", str(root / "cm"), "--out", str(out), "--batch-size", "8", "--micro-batch-size", "4", "--max-new-tokens", "12", "--save-every", "1", "--lr", "1e-3",
            "--critic-lr", "1e-3", "--threshold", "0.0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["sgd", "pid"])
def test_ppo_two_ranks_match_one_process(tmp_path, checkpoints, rule):
    # PTX too: its token mean spans both ranks.
    extra = ["--max-steps", "3", "--ptx-coeff", "0.5", "--lambda-update", rule]
    run("ppo_lag.py", ppo_args(checkpoints, tmp_path / "one", *extra))
    run("ppo_lag.py", ppo_args(checkpoints, tmp_path / "two", *extra), nproc=2)
    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert len({r["lambda"] for r in one}) == 3  # lambda moved at every iteration
    for r1, r2 in zip(one, two):
        for key in ("reward", "cost", "lambda", "kl", "response_length", "actor_loss", "reward_critic_loss",
                    "cost_critic_loss", "entropy", "mean_episode_cost", "reward_value_ev", "cost_value_ev",
                    "ptx_loss"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-6), (r1["step"], key)
    assert_same_weights(tmp_path / "one" / "actor", tmp_path / "two" / "actor", rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["sgd", "pid"])
def test_ppo_resume_after_sigkill_matches_uninterrupted(tmp_path, checkpoints, rule):
    args = ppo_args(checkpoints, tmp_path / "straight", "--max-steps", "6", "--lambda-update", rule)
    run("ppo_lag.py", args)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    cmd = [sys.executable, str(ROOT / "ppo_lag.py"), *ppo_args(checkpoints, killed, "--max-steps", "6", "--lambda-update", rule)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        log = killed / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "actor").exists(), "the run finished before it could be killed"
    run("ppo_lag.py", ppo_args(checkpoints, killed, "--max-steps", "6", "--lambda-update", rule))
    a, b = log_of(tmp_path / "straight"), log_of(killed)
    assert len({r["lambda"] for r in a}) > 1
    assert [r["step"] for r in b] == list(range(1, 7))
    skip = {"time_generate", "time_score", "time_learn", "samples_per_s"}
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}
    assert_same_weights(tmp_path / "straight" / "actor", killed / "actor", rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "reward_shaping", "ppo_lag+ptx"])
def test_each_algo_runs(tmp_path, checkpoints, algo):
    name, _, ptx = algo.partition("+")
    extra = ["--max-steps", "2", "--algo", name, "--lambda-init", "2.0"]
    if name == "ppo":
        extra += ["--cost-model", "none"]
    if ptx:
        extra += ["--ptx-coeff", "0.5"]
    run("ppo_lag.py", ppo_args(checkpoints, tmp_path / name, *extra))
    log = log_of(tmp_path / name)
    assert len(log) == 2 and (tmp_path / name / "actor" / "model.safetensors").exists()
    if name == "ppo_lag":
        assert log[-1]["ptx_loss"] > 0 and "cost_critic_loss" in log[-1]
    else:
        assert log[-1]["lambda"] == pytest.approx(2.0 if name == "reward_shaping" else 0.0)
        assert "cost_critic_loss" not in log[-1] and "reward_critic_loss" in log[-1]


@pytest.mark.slow
def test_ppo_bf16_two_ranks_runs(tmp_path, checkpoints):
    # The GPU default (bf16 mixed precision under FSDP2) on CPU: generation with gathered bf16
    # parameters and a bf16 KV cache, scoring, and the PPO updates of actor and critics.
    run("ppo_lag.py", ppo_args(checkpoints, tmp_path / "bf16", "--max-steps", "2", "--precision", "bf16"), nproc=2)
    log = log_of(tmp_path / "bf16")
    assert [r["step"] for r in log] == [1, 2]
    # The frozen reference holds bf16 weights, the actor fp32 ones cast to bf16 for its forward:
    # the same numbers, so before the first update the two agree exactly.
    assert log[0]["kl"] == 0.0 and log[1]["kl"] != 0.0
    # Activation checkpointing (on in the authors' 7B recipe) recomputes the same forward under FSDP.
    run("ppo_lag.py", ppo_args(checkpoints, tmp_path / "bf16_ac", "--max-steps", "2", "--precision", "bf16",
                               "--activation-checkpointing"), nproc=2)
    for r, r_ac in zip(log, log_of(tmp_path / "bf16_ac"), strict=True):
        for key in ("actor_loss", "reward_critic_loss", "cost_critic_loss", "kl", "lambda"):
            assert r_ac[key] == pytest.approx(r[key], rel=1e-6, abs=1e-9), key
    for key in ("reward", "cost", "kl", "actor_loss", "reward_critic_loss", "cost_critic_loss", "entropy"):
        assert all(math.isfinite(r[key]) for r in log), key
    weights = load_file(tmp_path / "bf16" / "actor" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("pad", ["unk", "eos"])
def test_rollouts_line_up_with_an_independent_recomputation(tmp_path, checkpoints, monkeypatch, pad):
    # Every tensor of the first iteration's rollouts, recomputed apart from ppo_lag.py: log-probs by
    # transformers' LLaMA on the actor's weights, scores by the score models on each answer alone
    # (no padding), masks from the token ids. The actor's EOS row is scaled up so that most answers
    # end with an EOS inside the length limit and some run to it. pad "eos": the actor's
    # tokenizer_config.json pads with the EOS, as Qwen's releases do, so an answer's EOS is followed by
    # more EOS ids that are padding, and the prompts are left-padded with EOS ids.
    from data.tokenizer import Tokenizer

    transformers = pytest.importorskip("transformers")
    sft = checkpoints.root / "sft"
    tok = Tokenizer(sft / "tokenizer.model")
    actor = hf_io.load_pretrained(sft)
    with torch.no_grad():
        actor.output.weight[tok.eos_id] *= 60
    hf_io.save_pretrained(actor, tmp_path / "actor", extra_files=[sft / "tokenizer.model"])
    if pad == "eos":
        (tmp_path / "actor" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "</s>"}))
        tok = Tokenizer(tmp_path / "actor")
        assert tok.pad_id == tok.eos_id
    monkeypatch.setenv("KERNELS", "torch")
    argv = ppo_args(checkpoints, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--actor") + 1] = str(tmp_path / "actor")
    # The first iteration's rollouts, through the functions main() calls.
    args = ppo_lag.parse_args(argv)
    d = training.setup_distributed(args.device, args.precision)
    data = ppo_lag.load_data(args, d)
    models = ppo_lag.load_models(args, d, data.tok, total_steps=1)
    captured, _ = ppo_lag.rollout(1, models, data.prompts, args, d, data.tok)
    ppo_lag.advantages(captured, 1.0, args)

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "actor", attn_implementation="eager").float().eval()
    reward_model = hf_io.load_pretrained(checkpoints.root / "rm").eval()
    cost_model = hf_io.load_pretrained(checkpoints.root / "cm").eval()
    ended = truncated = 0
    for r in captured:
        seq, mask, actions = r.sequences, r.attention_mask, r.action_mask
        width = seq.shape[1]
        # The answer starts where the left-padded prompts end: one column for the whole batch,
        # right after the template's "ASSISTANT:".
        first_action = {int(row.nonzero().min()) for row in actions}
        assert len(first_action) == 1
        start = first_action.pop() + 1
        for b in range(seq.shape[0]):
            prompt = tok.decode(seq[b, :start][mask[b, :start].bool()].tolist())
            assert prompt.endswith("ASSISTANT:"), prompt
            # Actions are exactly the positions that predict a real answer token (EOS included).
            expected = torch.zeros(width - 1)
            expected[start - 1:] = mask[b, start:].float()
            assert torch.equal(actions[b].float(), expected), b
            last = int(actions[b].nonzero().max()) + 1  # the answer's last token
            if r.truncated[b]:
                truncated += 1
                assert last == width - 1 and seq[b, last] != tok.eos_id
            else:
                ended += 1
                assert seq[b, last] == tok.eos_id and not (seq[b, start:last] == tok.eos_id).any()
                assert (seq[b, last + 1:] == tok.pad_id).all() and not mask[b, last + 1:].any()
            # Scores of the answer alone, without padding: end score at its last token, the critic
            # (initialised from the reward model) valued at every action position.
            alone = seq[b, mask[b].bool()][None]
            with torch.no_grad():
                rewards, costs = reward_model(alone)[0], cost_model(alone)[0]
            assert float(r.reward[b]) == pytest.approx(float(rewards[-1]), abs=1e-5)
            assert float(r.cost[b]) == pytest.approx(float(costs[-1]), abs=1e-5)
            real_positions = mask[b].nonzero().squeeze(1)
            on_actions = actions[b][real_positions[:-1]].bool()
            torch.testing.assert_close(r.reward_values[b][real_positions[:-1]][on_actions], rewards[:-1][on_actions],
                                       rtol=1e-5, atol=1e-5)
            # Before any update the KL is zero, so the return at the last action is the end score.
            assert float(r.reward_returns[b, last - 1]) == pytest.approx(float(r.reward[b]), abs=1e-5)
            assert float(r.cost_returns[b, last - 1]) == pytest.approx(float(r.cost[b]), abs=1e-5)
        with torch.no_grad():
            logits = hf(input_ids=seq, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        hf_logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
        on = actions.bool()
        torch.testing.assert_close(r.old_logp[on].double(), hf_logp[on], rtol=0, atol=1e-4)
        assert torch.equal(r.ref_logp[on], r.old_logp[on])  # the reference is the actor before any update
    assert ended >= 2 and truncated >= 1, (ended, truncated)


# ------------------------------------------------------------------------------------------------
# rollout(), diagnostics() and the initial-cost report on tiny in-memory models, against plain
# float64 recomputations on each answer alone (no padding)


def rollout_setup(batch_size):
    actor = tiny_model(0)
    with torch.no_grad():
        actor.output.weight[2] *= 3  # EOS (id 2) likely enough that some answers end and some are cut
    models = ppo_lag.Models(actor=actor, reference=tiny_model(1), reward_model=tiny_model(2, "score"),
                            cost_model=tiny_model(3, "score"), reward_critic=tiny_model(4, "score"),
                            cost_critic=tiny_model(5, "score"), optimizers={})
    prompts = [[1] + [3 + (i * 7 + j) % 16 for j in range(1 + i % 3)] for i in range(batch_size)]
    args = SimpleNamespace(batch_size=batch_size, micro_batch_size=4, seed=7, max_new_tokens=5, temperature=1.0,
                           top_p=1.0, decode="eager", truncation_penalty=3.0)
    return models, prompts, args, SimpleNamespace(pad_id=0, eos_ids=[2])


def test_rollout_scores_reference_and_truncation_by_hand():
    """Each answer recomputed alone: the reward model's and the cost model's end score at its last token
    (the reward minus --truncation-penalty when cut without EOS), the actor's and the *reference's*
    log-probs of every answer token, and the critics' values."""
    models, prompts, args, tok = rollout_setup(8)
    rollouts, _ = ppo_lag.rollout(1, models, prompts, args, ONE_PROCESS, tok)
    cut = ended = 0
    chunks = training.batches_for_step(0, len(prompts), args.batch_size, args.micro_batch_size, ONE_PROCESS, args.seed)
    for r, idx in zip(rollouts, chunks, strict=True):
        for b in range(r.sequences.shape[0]):
            seq = r.sequences[b][r.attention_mask[b].bool()]
            prompt = prompts[idx[b]]
            n_prompt = len(prompt)
            assert seq[:n_prompt].tolist() == prompt
            answer = seq[n_prompt:].tolist()
            is_cut = 2 not in answer
            assert answer and (is_cut or answer.index(2) == len(answer) - 1)
            cut, ended = cut + is_cut, ended + (not is_cut)
            assert bool(r.truncated[b]) == is_cut
            # one action per answer token, on the positions that predict them
            assert int(r.action_mask[b].sum()) == len(answer)
            with torch.no_grad():
                ids = seq[None]
                reward = float(models.reward_model(ids)[0, -1].double()) - (3.0 if is_cut else 0.0)
                cost = float(models.cost_model(ids)[0, -1].double())
                expected = {}
                for name in ("actor", "reference"):
                    logp = torch.log_softmax(getattr(models, name)(ids)[0].double(), -1)
                    expected[name] = [float(logp[t - 1, seq[t]]) for t in range(n_prompt, len(seq))]
                values = models.reward_critic(ids)[0, n_prompt - 1:-1].double().tolist()
            assert float(r.reward[b]) == pytest.approx(reward, abs=1e-5)
            assert float(r.cost[b]) == pytest.approx(cost, abs=1e-5)
            on = r.action_mask[b].bool()
            assert r.old_logp[b][on].double().tolist() == pytest.approx(expected["actor"], abs=1e-5)
            assert r.ref_logp[b][on].double().tolist() == pytest.approx(expected["reference"], abs=1e-5)
            assert r.reward_values[b][on].double().tolist() == pytest.approx(values, abs=1e-5)
    assert cut >= 1 and ended >= 1, (cut, ended)


def test_rollout_samples_do_not_depend_on_the_rank_split():
    """Rank 1 of 2, with two micro-batches per rank (global micro-batches 1 and 3), samples exactly the
    answers one process samples for those rows: the noise is drawn per global row."""
    models, prompts, args, tok = rollout_setup(16)
    one, _ = ppo_lag.rollout(1, models, prompts, args, ONE_PROCESS, tok)
    rank1, _ = ppo_lag.rollout(1, models, prompts, args, training.Dist(1, 2, 0, torch.device("cpu"), None), tok)
    assert len(one) == 4 and len(rank1) == 2
    for mine, theirs in zip(rank1, (one[1], one[3]), strict=True):
        assert torch.equal(mine.sequences, theirs.sequences)
    assert not torch.equal(one[1].sequences[:, -args.max_new_tokens:], one[3].sequences[:, -args.max_new_tokens:])


def test_diagnostics_by_hand():
    """Per-answer means over the global batch: reward, cost, share of positive costs, KL summed over
    the answer's tokens, answer length in tokens (actions, not the prompt), share cut without EOS."""
    r1 = rollout_by_hand()  # answer of 2 tokens after 2 prompt tokens; KL (0, 0.5, -1)
    r2 = rollout_by_hand(sequences=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]),
                         action_mask=torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), truncated=torch.tensor([True, False]),
                         reward=torch.tensor([-1.0, 0.5]), cost=torch.tensor([0.5, -2.0]),
                         old_logp=torch.tensor([[0.0, 0.0, -1.0], [0.0, -3.0, 0.0]]), ref_logp=torch.tensor([[0.0, 0.0, -2.0], [0.0, -1.0, 5.0]]),
                         reward_values=torch.zeros(2, 3), cost_values=torch.zeros(2, 3))
    args = SimpleNamespace(algo="ppo_lag", kl_coeff=0.1, clip_range_score=50.0, gamma=1.0, gae_lambda=1.0, batch_size=3)
    ppo_lag.advantages([r1, r2], 1.0, args)
    m = ppo_lag.diagnostics([r1, r2], args, ONE_PROCESS, tok=None)
    assert m["reward"] == pytest.approx((2.0 - 1.0 + 0.5) / 3)
    assert m["cost"] == pytest.approx((-1.0 + 0.5 - 2.0) / 3)
    assert m["cost_positive_share"] == pytest.approx(1 / 3)
    assert m["kl"] == pytest.approx(((0.5 - 1.0) + 1.0 + (-2.0)) / 3)  # (-3) - (-1) = -2 on row 2's one action
    assert m["response_length"] == pytest.approx((2 + 1 + 1) / 3)
    assert m["truncated_share"] == pytest.approx(1 / 3)


def test_initial_cost_report_warns_on_either_side_of_the_costs(capsys):
    rollouts = [SimpleNamespace(cost=torch.arange(-10, 11).float() / 10)]  # 5% quantile -0.9, 95% quantile 0.9
    for threshold, warning in ((0.0, None), (0.85, None), (-0.95, "grow"), (0.95, "shrink"), (5.0, "shrink")):
        args = SimpleNamespace(algo="ppo_lag", cost_model="cm", threshold=threshold)
        ppo_lag.report_initial_costs(rollouts, args, ONE_PROCESS)
        out = capsys.readouterr().out
        assert "quantiles 5/25/50/75/95% = -0.90 / -0.50 / 0.00 / 0.50 / 0.90" in out
        if warning is None:
            assert "warning" not in out, threshold
        else:
            assert f"lies outside the 5-95% range of these costs: lambda will only {warning}" in out, threshold


def test_reference_flag_loads_the_kl_reference(tmp_path):
    """--reference: the frozen KL reference comes from that folder, not from --actor (rounds.py --reference sft).
    Every model must embed the tokenizer's ids: one that embeds fewer is named."""
    for name, seed, head in (("actor", 0, "lm"), ("ref", 1, "lm"), ("rm", 2, "score"), ("cm", 3, "score")):
        hf_io.save_pretrained(tiny_model(seed, head), tmp_path / name)
        hf_io.save_pretrained(tiny_model(seed, head, vocab_size=16), tmp_path / f"{name}_small")
    args = SimpleNamespace(seed=0, offload_frozen=False, activation_checkpointing=False, cpu_offload=False,
                           actor=str(tmp_path / "actor"), reference=str(tmp_path / "ref"),
                           reward_model=str(tmp_path / "rm"), cost_model=str(tmp_path / "cm"), algo="ppo_lag",
                           warmup_ratio=0.0, lr=1e-3, critic_lr=1e-3, weight_decay=0.0)
    models = ppo_lag.load_models(args, ONE_PROCESS, SimpleNamespace(vocab_size=20, path="tok"), total_steps=1)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(models.reference(ids), tiny_model(1)(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(models.actor(ids), tiny_model(0)(ids), rtol=1e-5, atol=1e-5)
    for flag, name in (("actor", "actor"), ("reference", "ref"), ("reward_model", "rm"), ("cost_model", "cm")):
        small = SimpleNamespace(**{**vars(args), flag: str(tmp_path / f"{name}_small")})
        with pytest.raises(ValueError, match=f"tok has 20 ids but .*{name}_small only embeds 16"):
            ppo_lag.load_models(small, ONE_PROCESS, SimpleNamespace(vocab_size=20, path="tok"), total_steps=1)


def test_ptx_dialogues_are_cut_at_prompt_plus_answer_length(checkpoints):
    """PTX dialogues are whole SFT dialogues up to --max-length + --max-new-tokens (the longest rollout
    sequence), not cut at the prompt limit --max-length."""
    from data.loaders import load_sft
    from data.tokenizer import encode_dialogue

    args = ppo_lag.parse_args(ppo_args(checkpoints, checkpoints.root / "unused", "--ptx-coeff", "0.5",
                                       "--max-length", "40", "--max-new-tokens", "40"))
    data = ppo_lag.load_data(args, ONE_PROCESS)
    raw, _ = load_sft(checkpoints.synthetic / "sft_train.jsonl", seed=args.seed, log=None)
    expected = [encode_dialogue(data.tok, ex.prompt, ex.response)[0] for ex in raw]
    assert max(map(len, expected)) > 40 and max(map(len, expected)) <= 80
    assert [ex.input_ids for ex in data.ptx] == expected
