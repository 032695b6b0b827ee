"""bench/memory_plan.py: the sharding arithmetic against a hand count, the fake-tensor simulation
against that arithmetic, activation checkpointing lowering the activation figure, the command
giving a verdict for llama-3-8b, and the plan against bench/measure_memory.py's measurement of the
same iteration at a tiny shape (bench/validate_memory_plan.py does it at a larger one, results in
bench/RESULTS.md)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "bench" / "memory_plan.py"


def load_bench_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


mp = load_bench_module("memory_plan")

# dim 32, 2 layers, 4 heads of 8 (2 kv heads: k and v have 16 rows), SwiGLU width 64, vocab 64.
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64)


def hand_count(world: int, head: str) -> int:
    """Elements of one rank's FSDP2 shards, counted by hand: each [rows, cols] matrix keeps
    ceil(rows / world) of its rows, each vector ceil(len / world) entries."""
    def rows(n):
        return -(-n // world)

    block = (rows(32) * 32      # wq [32, 32]
             + rows(16) * 32    # wk [16, 32]
             + rows(16) * 32    # wv [16, 32]
             + rows(32) * 32    # wo [32, 32]
             + rows(64) * 32    # w1 [64, 32]
             + rows(32) * 64    # w2 [32, 64]
             + rows(64) * 32    # w3 [64, 32]
             + 2 * rows(32))    # attention_norm, ffn_norm [32]
    body = 2 * block + rows(64) * 32 + rows(32)  # two blocks, tok_embeddings [64, 32], norm [32]
    if head == "lm":
        return body + rows(64) * 32  # output [64, 32]
    return body + rows(1) * 32 + rows(1)  # score_head: weight [1, 32] (one row on every rank), bias [1]


def test_hand_count_of_the_full_model():
    # world 1: the whole model. LM: 2 x 9280 + 2048 + 32 + 2048; score: the head is 32 + 1.
    assert hand_count(1, "lm") == 22688
    assert hand_count(1, "score") == 20673
    args = ModelArgs(**TINY)
    assert sum(math.prod(shape) for shape in mp.param_shapes(args, "lm").values()) == 22688
    assert sum(math.prod(shape) for shape in mp.param_shapes(args, "score").values()) == 20673


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("head", ["lm", "score"])
def test_sharding_arithmetic_matches_the_hand_count(world, head):
    args = ModelArgs(**TINY)
    n = hand_count(world, head)
    assert sum(mp.shard_numel(s, world) for s in mp.param_shapes(args, head).values()) == n
    trained = mp.model_state_bytes(args, head, world, trainable=True, mixed_precision=True)
    assert (trained["params"], trained["grads"], trained["optimizer"]) == (4 * n, 4 * n, 8 * n)
    frozen = mp.model_state_bytes(args, head, world, trainable=False, mixed_precision=True)
    assert (frozen["params"], frozen["grads"], frozen["optimizer"]) == (2 * n, 0, 0)  # bf16, no grads nor state
    frozen32 = mp.model_state_bytes(args, head, world, trainable=False, mixed_precision=False)
    assert frozen32["params"] == 4 * n


def test_shard_numel_pads_every_rank_to_the_largest_chunk():
    assert mp.shard_numel((10, 3), 4) == 3 * 3  # chunks of 3, 3, 3, 1 rows: every rank holds 3
    assert mp.shard_numel((1, 32), 8) == 32  # a one-row matrix is not split
    assert mp.shard_numel((4096,), 8) == 512


def test_known_values_answer_host_syncs_from_the_integer_data():
    """Under the plan's FakeTensorMode, KnownValues gives the real code's host syncs the answers of
    the real data: data-dependent shapes, item/tolist, writes through views; the sampler's choice
    is the stand-in token; a logged float reads 0.0; a decision on unknown data is an error."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, mp.KnownValues(fake, sampled_token=2):
        mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
        assert isinstance(mask, FakeTensor)
        assert mask.sum(0).nonzero().shape == (3, 1) and mask[:, 2].nonzero().shape == (1, 1)
        assert int(mask.sum()) == 4 and mask[:, 0].tolist() == [0, 1]
        ids = torch.full((2, 4), 7)
        ids[:, 1:3] = mask[:, :2]
        assert ids.tolist() == [[7, 0, 1, 7], [7, 1, 1, 7]]
        assert torch.randn(2, 10).argmax(-1).tolist() == [2, 2]
        assert float(torch.randn(3).sum()) == 0.0
        with pytest.raises(RuntimeError, match="needs tensor values the fake run does not know"):
            bool((torch.randn(3) > 0).any())


def run_plan(*flags, timeout=600):
    """The command in a fresh process (the simulation owns a fake process group)."""
    out = subprocess.run([sys.executable, str(PLAN), *flags], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


TINY_FLAGS = ["--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "64", "--hidden", "64"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_simulation_holds_what_the_arithmetic_says(world, tmp_path):
    """The real training.shard on a fake process group of `world` ranks stores exactly the hand-counted
    shards (frozen models in bf16), and AdamW's own first step creates 2 fp32 tensors per shard
    (plus a 4-byte step counter per parameter tensor)."""
    path = tmp_path / "plan.json"
    run_plan(*TINY_FLAGS, "--gpus", str(world), "--micro-batch", "2", "--max-length", "16", "--device", "cpu",
             "--no-flip", "--json", str(path))
    resident = json.loads(path.read_text())["resident"]["device"]
    lm, score = hand_count(world, "lm"), hand_count(world, "score")
    # actor + reward critic + cost critic in fp32; reference (LM) + reward + cost models in bf16
    assert resident["params"] == 4 * (lm + 2 * score) + 2 * (lm + 2 * score)
    tensors_per_model = {"lm": 2 * 9 + 3, "score": 2 * 9 + 4}
    n_tensors = tensors_per_model["lm"] + 2 * tensors_per_model["score"]
    assert resident["optimizer"] == 8 * (lm + 2 * score) + 4 * n_tensors


def test_activation_checkpointing_lowers_the_activation_figure(tmp_path):
    path = tmp_path / "plan.json"
    flags = ["--dim", "64", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--vocab", "128", "--hidden", "128",
             "--gpus", "2", "--micro-batch", "4", "--max-length", "64", "--device", "cpu"]
    text = run_plan(*flags, "--json", str(path))
    summary = json.loads(path.read_text())["summary"]
    for who, acts in summary["activations"].items():
        assert acts["AC on"] < acts["AC off"], (who, acts)
    actor = summary["activations"]["actor"]
    assert actor["AC on"] < 0.5 * actor["AC off"]
    assert "activations (the most live during a forward+backward" in text
    # and the forward+backward peak goes down with it
    phases = json.loads(path.read_text())["phases"]
    assert phases["learning: actor fwd+bwd"]["peak"] < phases["learning: actor fwd+bwd (AC flipped)"]["peak"]


def test_stages_sft_and_score_run(tmp_path):
    for stage in ("sft", "score"):
        text = run_plan(*TINY_FLAGS, "--gpus", "2", "--stage", stage, "--micro-batch", "2", "--max-length", "16",
                        "--device", "cpu")
        assert f"stage {stage}" in text and "verdict:" in text


@pytest.mark.slow
def test_command_gives_a_verdict_for_llama_3_8b():
    """The full simulation of six 8B models on 8 ranks (about a minute on two cores)."""
    text = run_plan("--preset", "llama-3-8b", "--gpus", "8", "--algo", "ppo_lag", "--micro-batch", "16",
                    "--max-length", "512", "--gpu-gb", "80", "--no-flip", "--decode-steps", "1")
    assert "vocab 128256" in text and "6 models" in text
    verdict = [line for line in text.splitlines() if line.startswith("verdict:")]
    assert len(verdict) == 1 and ("FITS" in verdict[0] or "DOES NOT FIT" in verdict[0])
    assert "peak phase:" in text


def test_algorithms_and_offloading(tmp_path):
    """--algo ppo has no cost model nor cost critic, reward_shaping no cost critic; the offload flags move
    the shards (and the trained models' gradients and AdamW state) to the host column."""
    common = [*TINY_FLAGS, "--gpus", "2", "--micro-batch", "2", "--max-length", "16", "--device", "cpu", "--no-flip"]
    assert "PPO (ppo): 4 models" in run_plan(*common, "--algo", "ppo")
    assert "PPO (reward_shaping): 5 models" in run_plan(*common, "--algo", "reward_shaping")
    plain, offloaded = tmp_path / "plain.json", tmp_path / "offloaded.json"
    run_plan(*common, "--json", str(plain))
    run_plan(*common, "--offload-frozen", "--cpu-offload", "--json", str(offloaded))
    plain, offloaded = json.loads(plain.read_text()), json.loads(offloaded.read_text())
    lm, score = hand_count(2, "lm"), hand_count(2, "score")
    device = offloaded["resident"]["device"]
    assert device.get("params", 0) == 0 and device.get("optimizer", 0) == 0
    assert offloaded["resident"]["host"]["params"] == plain["resident"]["device"]["params"] == 6 * (lm + 2 * score)
    for phase in ("generation", "scoring", "learning"):
        assert offloaded["phases"][phase]["peak"] < plain["phases"][phase]["peak"]
        assert offloaded["phases"][phase]["host_peak"] > 0


def test_plan_agrees_with_the_measurement(tmp_path):
    """The real iteration measured under torchrun (2 gloo ranks on CPU, bf16 mixed precision,
    activation checkpointing: bench/measure_memory.py) and the plan of it (the same ppo_lag code on
    fake tensors, bench/memory_plan.py --device cpu) agree phase by phase: the plan's peaks within
    15 % of the allocator's, and its live-tensor accounting within 2 % of the same accounting on the
    real tensors (the plan plays rank 0; the measurement takes the largest rank). Neither script can
    drift from ppo_lag.py, nor from each other, unseen. About 20 s on two cores."""
    vm = load_bench_module("validate_memory_plan")
    shape = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "512", "--hidden", "128"]
    run = ["--micro-batch", "2", "--max-length", "32"]
    measured = vm.measure(2, "bf16", True, tmp_path, rerun=True, shape=shape, run=run, models_dir=tmp_path / "models")
    planned = vm.plan(2, "bf16", True, tmp_path, shape=shape, run=run)
    rows = vm.compare(measured, planned)
    assert [r["phase"] for r in rows] == vm.PHASES
    for r in rows:
        assert abs(r["diff"]) <= 0.15, r
        assert abs(r["plan"] - r["tensors"]) <= 0.02 * r["tensors"], r
    assert planned["rollout_width"] == 32  # every answer ran to --max-new-tokens: the worst case


def test_state_table_counts_the_whole_model_and_one_shard():
    # The table's parameter count is the whole model's (hand count at world 1), its bytes one rank's shard.
    args = ModelArgs(**TINY)
    for world in (2, 4):
        s = mp.model_state_bytes(args, "lm", world, trainable=True, mixed_precision=True)
        assert s["numel"] == 22688 and s["shard_numel"] == hand_count(world, "lm") < 22688


def test_verdict_adds_both_margins():
    # needed = peak x (1 + frag) + fixed, against the GPU's capacity, all in bytes.
    GiB = 2**30
    v = mp.verdict(10 * GiB, gpu_gib=20, frag=0.10, fixed_gib=2)
    assert v["needed"] == pytest.approx(13 * GiB) and v["capacity"] == 20 * GiB and v["fits"]
    v = mp.verdict(17 * GiB, gpu_gib=20, frag=0.10, fixed_gib=2)  # 18.7 + 2 = 20.7 GiB
    assert v["needed"] == pytest.approx(20.7 * GiB) and not v["fits"]
    assert mp.verdict(18 * GiB, gpu_gib=20, frag=0.0, fixed_gib=2)["fits"]  # exactly full still fits
