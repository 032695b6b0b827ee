"""sft.py and train_score.py: losses against hand-computed values, 2 ranks against 1 process,
resume after SIGKILL against an uninterrupted run."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import hf_io
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def softplus(x):  # -log sigmoid(-x), written out
    return math.log(1.0 + math.exp(x))


def test_reward_loss_by_hand():
    from train_score import reward_loss

    better, worse, mu = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), 0.1
    # pair 1: -log sigmoid(1 - 0) = log(1 + e^-1); L2: 0.1 * (1 + 0) / 2
    # pair 2: -log sigmoid(-0.5 - 0.5) = log(1 + e^1); L2: 0.1 * (0.25 + 0.25) / 2
    expected = (softplus(-1.0) + 0.05) + (softplus(1.0) + 0.025)
    assert reward_loss(better, worse, mu).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.7015233750364457, rel=1e-12)
    # Differences that are not mirror images of each other: swapping better and worse changes the loss.
    better, worse = torch.tensor([2.0, 0.5]), torch.tensor([-1.0, 1.0])
    # pair 1: -log sigmoid(3) = log(1 + e^-3); pair 2: -log sigmoid(-0.5) = log(1 + e^0.5); L2 0.1 (4 + 1 + 0.25 + 1) / 2
    expected = softplus(-3.0) + softplus(0.5) + 0.1 * 6.25 / 2
    assert reward_loss(better, worse, mu).item() == pytest.approx(expected, rel=1e-6)


def test_cost_loss_by_hand():
    from train_score import cost_loss

    safer, less_safe = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.25])
    safer_sign, less_safe_sign = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    mu = 0.01
    # pair 1: ranking -log s(2 - (-1)); signs -log s(+1 * 2) - log s(-1 * -1); L2 0.01 (4 + 1) / 2
    pair1 = softplus(-3.0) + softplus(-2.0) + softplus(-1.0) + 0.01 * 5.0 / 2
    # pair 2: the less safe answer scores lower (wrong order), the safe one is positive (wrong sign)
    pair2 = softplus(0.25) + softplus(-0.25) + softplus(0.5) + 0.01 * (0.0625 + 0.25) / 2
    got = cost_loss(safer, less_safe, safer_sign, less_safe_sign, mu).item()
    assert got == pytest.approx(pair1 + pair2, rel=1e-6)


def test_score_metrics_by_hand():
    """Accuracy counts a pair as right when the first answer (better / safer) is the preferred way
    round: the reward model's better answer scores higher, the cost model's less safe one costs more;
    sign accuracy is the share of the pair's two answers whose cost sign matches the label."""
    from train_score import OBJECTIVES

    first, second = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 3.0, -0.5])
    assert OBJECTIVES["reward"].correct(first, second).tolist() == [True, False, True]
    # cost: first = safer, second = less safe; right where less_safe > safer
    assert OBJECTIVES["cost"].correct(first, second).tolist() == [False, True, False]
    batch = {"safer_sign": torch.tensor([-1.0, -1.0, 1.0]), "less_safe_sign": torch.tensor([1.0, -1.0, 1.0])}
    # pair 1: safer 1.0 (+, labelled safe: wrong), less safe 0.0 (sign 0: wrong) -> 0
    # pair 2: safer -2.0 (right), less safe 3.0 labelled safe (wrong) -> 0.5
    # pair 3: safer 0.5 labelled harmful (right), less safe -0.5 labelled harmful (wrong) -> 0.5
    metrics = OBJECTIVES["cost"].per_pair_metrics(first, second, batch)
    assert metrics["sign_accuracy"].tolist() == [0.0, 0.5, 0.5]


def test_lr_schedule_by_hand():
    """Linear warmup from lr / (warmup + 1) (the first step is not wasted at 0), then cosine to 0 at
    total_steps; "constant" stays at lr after the warmup."""
    from training import build_optimizer

    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, 2.0, 0.0, warmup_steps=3, total_steps=11)
    lrs = []
    for _ in range(13):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # steps 0-2: 2 * (k + 1) / 4; steps 3-11: 2 * 0.5 (1 + cos(pi (k - 3) / 8)), floor 0 from step 11 on
    expected = [0.5, 1.0, 1.5] + [1.0 + math.cos(math.pi * (k - 3) / 8) for k in range(3, 11)] + [0.0, 0.0]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[3] == 2.0 and lrs[7] == pytest.approx(1.0) and lrs[11] == pytest.approx(0.0, abs=1e-12)
    optimizer, scheduler = build_optimizer(model, 2.0, 0.0, warmup_steps=1, total_steps=5, schedule="constant")
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [1.0, 2.0, 2.0, 2.0]


def test_train_step_gradient_is_the_global_mean():
    """train_step sums the micro-batches' summed losses and divides by the global unit count once:
    with plain SGD (lr 1) the update is minus the gradient of the mean loss over all units."""
    from training import Dist, train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    w0 = model.weight.detach().clone()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def loss_fn(rows):
        return ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).sum(), {"n": len(rows)}

    d = Dist(0, 1, 0, torch.device("cpu"), None)
    loss, sums, grad_norm, lr = train_step(model, optimizer, scheduler, [[0, 1], [2, 3, 4]], loss_fn, 5, d, 0.0)
    # The mean of (x w - y)^2 and its gradient 2/5 sum (x w - y) x, written out.
    residual = x @ w0[0] - y
    grad = 2.0 / 5.0 * (residual[:, None] * x).sum(0)
    assert loss == pytest.approx(float((residual ** 2).mean()), rel=1e-12)
    assert grad_norm == pytest.approx(float(grad.norm()), rel=1e-12)
    assert sums == {"n": 5.0} and lr == 1.0
    torch.testing.assert_close(model.weight.detach()[0], w0[0] - grad, rtol=1e-12, atol=1e-12)


def response_nll_by_hand(model, examples):
    """(summed NLL, count) of the response and EOS tokens of tokenized SFT examples, each run alone
    (no padding), from the model's logits in float64: token t is predicted at position t - 1."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor(ex.input_ids)
            logp = torch.log_softmax(model(ids[None])[0].double(), -1)
            for t in range(ex.n_prompt, len(ids)):
                nll -= float(logp[t - 1, ids[t]])
                count += 1
    return nll, count


def test_sft_logged_loss_is_the_token_mean(tmp_path, synthetic_dir):
    """sft.py's first logged loss (before any update) is the mean NLL over the step's response and EOS
    tokens, prompt and padding excluded, recomputed here from the fresh model's logits in float64."""
    import sft
    import training
    from data.loaders import load_sft, tokenize_sft
    from data.tokenizer import Tokenizer

    out = tmp_path / "sft"
    sft.main(["--synthetic-dir", str(synthetic_dir), "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "4",
              "--max-length", "96", "--seed", "3", "--out", str(out)])
    logged = log_of(out)[0]
    tok = Tokenizer(synthetic_dir / "tokenizer.model")
    examples, _ = tokenize_sft(tok, load_sft(synthetic_dir / "sft_train.jsonl", seed=3, log=None)[0], 96, log=None)
    d = training.Dist(0, 1, 0, torch.device("cpu"), None)
    rows = sum(training.batches_for_step(0, len(examples), 8, 4, d, 3), [])  # the step's 8 dialogues
    model = training.load_model("tiny", "lm", d, seed=3, vocab_size=tok.vocab_size)
    nll, count = response_nll_by_hand(model, [examples[i] for i in rows])
    assert logged["target_tokens"] == count
    assert logged["loss"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("pad_id", [0, 2])
def test_sft_nll_by_hand(pad_id):
    """The SFT loss covers response tokens and the EOS, not the prompt or the padding, whatever the
    pad id, the EOS's (2) included (Qwen's releases pad with an EOS)."""
    from data.loaders import TokenizedSFT, collate_sft
    from model import ModelArgs, Transformer
    from training import sft_nll

    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, hidden_dim=64))
    m.init_weights(std=0.3, seed=0)
    batch = collate_sft([TokenizedSFT([1, 5, 6, 7, 2], 3), TokenizedSFT([1, 8, 9, 2], 2)], pad_id=pad_id)
    nll, count = sft_nll(m, batch, "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(m(batch["input_ids"]).double(), -1)
    # row 0 predicts 7 (from position 2) and 2 (from 3); row 1 predicts 9 (from 1) and 2 (from 2)
    expected = -(logp[0, 2, 7] + logp[0, 3, 2] + logp[1, 1, 9] + logp[1, 2, 2])
    assert int(count) == 4
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Whole scripts, in subprocesses


@pytest.fixture(scope="module")
def synthetic_dir(synthetic_data):
    return synthetic_data.dir


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in parents.get(p, [])]
        found += children
        frontier = children
    return found


def run(script, args, nproc=1, env_extra=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch", **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *args]
    # Output goes to files, not pipes: on a timeout (a hang in a collective) torchrun and the ranks
    # it started are killed, and nothing a stray rank holds open can block the test.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            hung = True
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert not hung, f"{' '.join(cmd)} still running after {timeout} s (a hang?):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def log_of(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def assert_same_weights(dir_a, dir_b, rtol):
    a, b = load_file(Path(dir_a) / "model.safetensors"), load_file(Path(dir_b) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        rel = ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-12)).item()
        assert rel < rtol, f"{k}: relative difference {rel:.2e}"


SMALL = ["--max-steps", "3", "--batch-size", "16", "--micro-batch-size", "4", "--eval-every", "3",
         "--save-every", "3", "--max-length", "96"]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, synthetic_dir):
    common = [*SMALL, "--synthetic-dir", str(synthetic_dir)]
    run("sft.py", [*common, "--out", str(tmp_path / "sft1")])
    run("sft.py", [*common, "--out", str(tmp_path / "sft2")], nproc=2)
    one, two = log_of(tmp_path / "sft1"), log_of(tmp_path / "sft2")
    assert [r["step"] for r in one] == [1, 2, 3] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    assert one[-1]["eval_loss"] == pytest.approx(two[-1]["eval_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "sft1" / "model", tmp_path / "sft2" / "model", rtol=1e-5)

    # The cost model (the richer loss) from that SFT model, 1 process vs 2 ranks.
    score = [*common, "--objective", "cost", "--model", str(tmp_path / "sft1" / "model")]
    run("train_score.py", [*score, "--out", str(tmp_path / "cm1")])
    run("train_score.py", [*score, "--out", str(tmp_path / "cm2")], nproc=2)
    one, two = log_of(tmp_path / "cm1"), log_of(tmp_path / "cm2")
    for r1, r2 in zip(one, two):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
        assert r1["accuracy"] == r2["accuracy"]
    for key in ("eval_accuracy", "eval_sign_accuracy", "eval_score_mean"):
        assert one[-1][key] == pytest.approx(two[-1][key], rel=1e-5, abs=1e-6)
    assert_same_weights(tmp_path / "cm1" / "model", tmp_path / "cm2" / "model", rtol=1e-5)


@pytest.mark.slow
def test_bf16_mixed_precision_tracks_fp32(tmp_path, synthetic_dir):
    # What GPU runs do by default (--precision auto = bf16), run on CPU: FSDP2's MixedPrecisionPolicy
    # under 2 ranks (bf16 all-gather and compute, fp32 reduce-scatter) and bf16 autocast in one
    # process, against the fp32 run. Master weights, and so the saved model, stay fp32.
    common = [*SMALL, "--synthetic-dir", str(synthetic_dir)]
    run("sft.py", [*common, "--out", str(tmp_path / "fp32")])
    run("sft.py", [*common, "--out", str(tmp_path / "bf16x2"), "--precision", "bf16"], nproc=2)
    run("sft.py", [*common, "--out", str(tmp_path / "bf16"), "--precision", "bf16"])
    reference = log_of(tmp_path / "fp32")
    for name in ("bf16x2", "bf16"):
        log = log_of(tmp_path / name)
        for r_ref, r in zip(reference, log, strict=True):
            assert r["loss"] == pytest.approx(r_ref["loss"], rel=1e-2), (name, r["step"])
        assert log[-1]["eval_loss"] == pytest.approx(reference[-1]["eval_loss"], rel=3e-2), name
        weights = load_file(tmp_path / name / "model" / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}, name


@pytest.mark.slow
def test_real_data_commands_of_the_readme(tmp_path, synthetic_dir):
    # The README's GPU-node commands, shrunk: data files given on the command line select the
    # authors' recipe (SAFE_RLHF.md), here on files in the PKU-SafeRLHF and Alpaca schemas (the
    # synthetic task's) and a tiny model; only the step counts and batch sizes are overridden.
    alpaca, pku = f"{synthetic_dir / 'sft_train.jsonl'}:64", f"{synthetic_dir / 'preference_train.jsonl'}:64"
    pku_eval = f"{synthetic_dir / 'preference_eval.jsonl'}:32"
    small = ["--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--save-every", "2", "--eval-every", "2"]
    run("sft.py", ["--model", "tiny", "--tokenizer", str(synthetic_dir / "tokenizer.model"), "--data", alpaca,
                   *small, "--out", str(tmp_path / "sft")])
    assert log_of(tmp_path / "sft")[0]["lr"] == pytest.approx(2e-5)  # the authors' SFT learning rate
    sft_model = str(tmp_path / "sft" / "model")
    for objective in ("reward", "cost"):
        run("train_score.py", ["--objective", objective, "--model", sft_model, "--data", pku, "--eval-data", pku_eval,
                               *small, "--out", str(tmp_path / objective)])
    ppo = ["--actor", sft_model, "--reward-model", str(tmp_path / "reward" / "model"),
           "--cost-model", str(tmp_path / "cost" / "model"), "--prompts", pku, "--threshold", "0.0",
           *small, "--max-new-tokens", "8", "--out", str(tmp_path / "ppo")]
    with pytest.raises(AssertionError, match="needs --ptx-data"):  # the recipe's PTX needs SFT data
        run("ppo_lag.py", ppo)
    run("ppo_lag.py", [*ppo, "--ptx-data", alpaca])
    log = log_of(tmp_path / "ppo")
    assert [r["step"] for r in log] == [1, 2] and all(r["ptx_loss"] > 0 for r in log)
    assert (tmp_path / "ppo" / "actor" / "model.safetensors").exists()


@pytest.mark.slow
def test_eval_sets_that_split_unevenly_over_ranks(tmp_path, synthetic_dir):
    # 5 eval examples over 2 ranks in micro-batches of 2: rank 0 holds 3 (two forwards), rank 1
    # holds 2 (one). Under FSDP every forward is a collective, so both ranks must run two; with
    # 1 eval pair rank 1 holds nothing at all. Same results as one process, and no hang.
    common = ["--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "2", "--synthetic-dir", str(synthetic_dir)]
    sft_eval = ["--data", f"{synthetic_dir / 'sft_train.jsonl'}:32", "--eval-data", f"{synthetic_dir / 'sft_eval.jsonl'}:5",
                "--model", "tiny", "--tokenizer", str(synthetic_dir / "tokenizer.model")]
    for nproc in (1, 2):
        run("sft.py", [*common, *sft_eval, "--out", str(tmp_path / f"sft{nproc}")], nproc=nproc, timeout=180)
    assert log_of(tmp_path / "sft1")[-1]["eval_loss"] == pytest.approx(log_of(tmp_path / "sft2")[-1]["eval_loss"], rel=1e-5)
    for n_eval in (5, 1):
        score = [*common, "--objective", "cost", "--model", str(tmp_path / "sft1" / "model"),
                 "--data", f"{synthetic_dir / 'preference_train.jsonl'}:32",
                 "--eval-data", f"{synthetic_dir / 'preference_eval.jsonl'}:{n_eval}"]
        for nproc in (1, 2):
            run("train_score.py", [*score, "--out", str(tmp_path / f"cm{n_eval}_{nproc}")], nproc=nproc, timeout=180)
        one, two = log_of(tmp_path / f"cm{n_eval}_1")[-1], log_of(tmp_path / f"cm{n_eval}_2")[-1]
        for key in ("eval_accuracy", "eval_sign_accuracy", "eval_score_q50"):
            assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), (n_eval, key)


@pytest.mark.slow
def test_resume_across_world_sizes(tmp_path, synthetic_dir):
    # A checkpoint written by a plain process resumes under torchrun, and the other way round,
    # giving the losses and weights of an uninterrupted run.
    args = ["--max-steps", "3", "--batch-size", "16", "--micro-batch-size", "4", "--eval-every", "3",
            "--save-every", "1", "--max-length", "96", "--synthetic-dir", str(synthetic_dir)]
    run("sft.py", [*args, "--out", str(tmp_path / "straight")])
    straight = log_of(tmp_path / "straight")
    for first, second in ((1, 2), (2, 1)):
        out = tmp_path / f"{first}to{second}"
        run("sft.py", [*args, "--out", str(out)], nproc=first)
        # Rewind to the step-2 checkpoint, as if the run had died during step 3.
        shutil.rmtree(out / "checkpoints" / "step_00000003")
        shutil.rmtree(out / "model")
        (out / "checkpoints" / "latest").write_text("step_00000002\n")
        result = run("sft.py", [*args, "--out", str(out)], nproc=second)
        assert "resumed from" in result.stdout
        log = log_of(out)
        assert [r["step"] for r in log] == [1, 2, 3]
        assert log[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)
        assert log[-1]["eval_loss"] == pytest.approx(straight[-1]["eval_loss"], rel=1e-5)
        assert_same_weights(out / "model", tmp_path / "straight" / "model", rtol=1e-5)


@pytest.mark.slow
def test_load_model_under_fsdp_mixed_precision(tmp_path):
    from model import ModelArgs, Transformer

    rm = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=96), head="score")
    rm.init_weights(seed=0)
    hf_io.save_pretrained(rm, tmp_path / "rm")
    result = run("tests/dist_load_model.py", [str(tmp_path / "rm")], nproc=2, timeout=180)
    assert result.stdout.count(": ok") == 2


@pytest.mark.slow
def test_static_decoding_under_fsdp(tmp_path):
    """ppo_lag.py's actor (FSDP2, 2 ranks) samples the same tokens with the static decoding step as
    with the eager one inside training.gathered (tests/dist_static_decode.py; bf16 mixed precision
    runs the same path, compared only in fp32), and a sharded generate() leaves a fresh actor trainable."""
    from model import ModelArgs, Transformer

    lm = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96))
    lm.init_weights(std=0.3, seed=0)
    hf_io.save_pretrained(lm, tmp_path / "lm")
    for precision in ("fp32", "bf16"):
        result = run("tests/dist_static_decode.py", [str(tmp_path / "lm"), precision], nproc=2, timeout=180)
        assert result.stdout.count(": ok") == 2


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, synthetic_dir):
    args = ["--max-steps", "8", "--batch-size", "16", "--micro-batch-size", "8", "--eval-every", "4",
            "--save-every", "2", "--max-length", "96", "--synthetic-dir", str(synthetic_dir)]
    run("sft.py", [*args, "--out", str(tmp_path / "straight")])

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sft.py"), *args, "--out", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    log = killed / "log.jsonl"
    while time.time() < deadline:  # kill it somewhere after step 5, checkpoint or not
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    run("sft.py", [*args, "--out", str(killed)])

    a, b = log_of(tmp_path / "straight"), log_of(killed)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"] and ra["lr"] == rb["lr"]
    assert a[-1]["eval_loss"] == b[-1]["eval_loss"]
    assert_same_weights(tmp_path / "straight" / "model", killed / "model", rtol=1e-7)


@pytest.mark.slow
def test_embedded_task_quality(tmp_path, synthetic_dir, monkeypatch):
    """The default recipes on the synthetic task: SFT learns the dialogues, the reward and cost
    models reach >= 90% of the accuracy the task's label noise allows on held-out pairs, and the
    cost model gets the sign (safe < 0 < harmful) of >= 90% of held-out answers right."""
    import sft
    import train_score
    from data.loaders import load_sft, tokenize_sft
    from data.tokenizer import Tokenizer

    monkeypatch.setenv("KERNELS", "torch")
    torch.set_num_threads(1)
    common = ["--synthetic-dir", str(synthetic_dir)]
    sft.main([*common, "--out", str(tmp_path / "sft")])
    sft_eval = log_of(tmp_path / "sft")[-1]["eval_loss"]

    # The level for SFT: a unigram model of response tokens (no context at all), fitted on the
    # training responses and scored on the eval ones, computed here. Responses are canonical step
    # phrases chosen by the task, so context cuts the loss by far more than 4x; the only
    # randomness left is the response kind, the intro phrase and how many steps are given (a few
    # choice points in ~25 tokens), whose entropy floor is about 0.15 nats per token.
    tok = Tokenizer(synthetic_dir / "tokenizer.model")
    counts = torch.ones(tok.vocab_size, dtype=torch.float64)  # add-one smoothing
    train, _ = tokenize_sft(tok, load_sft(synthetic_dir / "sft_train.jsonl", log=None)[0], 128, log=None)
    for ex in train:
        counts += torch.bincount(torch.tensor(ex.input_ids[ex.n_prompt:]), minlength=tok.vocab_size)
    logp = torch.log(counts / counts.sum())
    held, _ = tokenize_sft(tok, load_sft(synthetic_dir / "sft_eval.jsonl", log=None)[0], 128, log=None)
    targets = torch.cat([torch.tensor(ex.input_ids[ex.n_prompt:]) for ex in held])
    unigram = float(-logp[targets].mean())
    assert sft_eval < 0.3 and sft_eval < unigram / 4, (sft_eval, unigram)

    ceiling = json.loads((synthetic_dir / "manifest.json").read_text())["stats"]["preference"]["ceiling_eval"]
    model = str(tmp_path / "sft" / "model")
    train_score.main([*common, "--objective", "reward", "--model", model, "--out", str(tmp_path / "rm")])
    rm = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert rm["eval_accuracy"] >= 0.9 * ceiling["reward_accuracy_realized"], rm
    train_score.main([*common, "--objective", "cost", "--model", model, "--out", str(tmp_path / "cm")])
    cm = json.loads((tmp_path / "cm" / "eval.json").read_text())
    assert cm["eval_accuracy"] >= 0.9 * ceiling["cost_accuracy_realized"], cm
    assert cm["eval_sign_accuracy"] >= 0.9, cm
    # The saved cost model carries its score statistics for choosing PPO's threshold.
    config = json.loads((tmp_path / "cm" / "model" / "config.json").read_text())
    assert config["score_stats"]["objective"] == "cost" and "q50" in config["score_stats"]


# ------------------------------------------------------------------------------------------------
# What the score models save for PPO's threshold, and sft.py's held-out loss, recomputed in float64


def quantile_by_hand(sorted_values, q):
    """Linear interpolation between order statistics (torch.quantile's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_score_stats_and_inconsistent_labels_by_hand(tmp_path, synthetic_dir):
    """config.json's score_stats (mean, std, quantiles of the held-out end scores) are those of every
    held-out answer scored alone by the saved model; rows whose safer answer is labelled unsafe and the
    other safe are dropped for the cost model only (the reward model reads no safety label)."""
    import train_score
    from data.tokenizer import Tokenizer, encode_dialogue
    from model import ModelArgs, Transformer

    sft_dir = tmp_path / "sft"
    lm = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=1024, hidden_dim=64, max_seq_len=128))
    lm.init_weights(seed=0)
    hf_io.save_pretrained(lm, sft_dir, extra_files=[synthetic_dir / "tokenizer.model"])
    rows = [json.loads(line) for line in (synthetic_dir / "preference_eval.jsonl").read_text().splitlines()[:12]]
    inconsistent = {0, 3, 7}
    for i in inconsistent:
        rows[i].update(is_response_0_safe=False, is_response_1_safe=True, safer_response_id=0)
    # The reward model's file may also hold rows without any safety label (the single-dimension schema).
    unlabelled = [{k: v for k, v in r.items() if k not in ("is_response_0_safe", "is_response_1_safe",
                                                              "safer_response_id")} if i in (1, 2) else r
                  for i, r in enumerate(rows)]
    for name, file_rows in (("reward", unlabelled), ("cost", rows)):
        (tmp_path / f"{name}_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in file_rows))
    tok = Tokenizer(synthetic_dir / "tokenizer.model")
    for objective, kept in (("reward", range(12)), ("cost", [i for i in range(12) if i not in inconsistent])):
        out = tmp_path / objective
        train_score.main(["--objective", objective, "--model", str(sft_dir), "--seed", "1",
                          "--data", f"{synthetic_dir / 'preference_train.jsonl'}:16",
                          "--eval-data", str(tmp_path / f"{objective}_eval.jsonl"),
                          "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "1", "--out", str(out)])
        stats = json.loads((out / "model" / "config.json").read_text())["score_stats"]
        model = hf_io.load_pretrained(out / "model").eval()
        scores = []
        with torch.no_grad():
            for i in kept:
                for answer in (rows[i]["response_0"], rows[i]["response_1"]):
                    ids, _ = encode_dialogue(tok, rows[i]["prompt"], answer)
                    scores.append(float(model(torch.tensor([ids]))[0, -1]))
        n = len(scores)
        mean = sum(scores) / n
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
        assert stats["objective"] == objective
        assert stats["mean"] == pytest.approx(mean, abs=1e-4), objective
        assert stats["std"] == pytest.approx(std, rel=1e-3), objective
        ordered = sorted(scores)
        for name, q in (("q05", 0.05), ("q25", 0.25), ("q50", 0.5), ("q75", 0.75), ("q95", 0.95)):
            assert stats[name] == pytest.approx(quantile_by_hand(ordered, q), abs=1e-4), (objective, name)


def test_sft_eval_loss_and_eval_fraction_by_hand(tmp_path, synthetic_dir):
    """Without --eval-data, --eval-fraction of --data is held out: the last step's eval_loss is the
    saved model's mean NLL over those dialogues' response and EOS tokens (eval_tokens of them), and the
    training step draws from the rest only."""
    import sft
    import training
    from data.loaders import load_sft, split_train_eval, tokenize_sft
    from data.tokenizer import Tokenizer

    out = tmp_path / "sft"
    data = f"{synthetic_dir / 'sft_train.jsonl'}:40"
    sft.main(["--model", "tiny", "--tokenizer", str(synthetic_dir / "tokenizer.model"), "--data", data,
              "--eval-fraction", "0.25", "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "4",
              "--max-length", "96", "--seed", "3", "--out", str(out)])
    logged = log_of(out)[-1]
    tok = Tokenizer(synthetic_dir / "tokenizer.model")
    train, held_out = split_train_eval(load_sft(data, seed=3, log=None)[0], 0.25, seed=3)
    assert len(held_out) == 10 and len(train) == 30
    model = hf_io.load_pretrained(out / "model").eval()
    nll, count = response_nll_by_hand(model, tokenize_sft(tok, held_out, 96, log=None)[0])
    assert logged["eval_tokens"] == count
    assert logged["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
    train_set = tokenize_sft(tok, train, 96, log=None)[0]
    d = training.Dist(0, 1, 0, torch.device("cpu"), None)
    rows = sum(training.batches_for_step(0, len(train_set), 8, 4, d, 3), [])
    assert logged["target_tokens"] == sum(len(train_set[i].input_ids) - train_set[i].n_prompt for i in rows)
