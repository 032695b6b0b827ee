"""What a researcher gets by accident: a reused --out, changed flags on resume, swapped models,
impossible flag values, empty data, a damaged checkpoint. Each gets a clear error naming the
flag, file or step, or the documented behaviour; never a silent wrong run. The stage scripts run
in-process (their main() takes argv) on a tiny model, a few steps."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import ppo_lag
import sft
import train_score
import hf_io
from model import ModelArgs, Transformer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(synthetic_data):
    return synthetic_data


def sft_args(task, out, *extra):
    return ["--model", "tiny", "--tokenizer", str(task.tokenizer), "--data", f"{task.sft_train}:64",
            "--eval-data", f"{task.sft_eval}:8", "--batch-size", "8", "--micro-batch-size", "4",
            "--save-every", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    """A 2-step SFT model and reward/cost models trained from it (2 steps each)."""
    root = tmp_path_factory.mktemp("cli")
    sft.main(sft_args(task, root / "sft", "--max-steps", "2"))
    for objective in ("reward", "cost"):
        train_score.main(["--objective", objective, "--model", str(root / "sft" / "model"),
                          "--data", f"{task.preference_train}:64", "--eval-data", f"{task.preference_eval}:16",
                          "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                          "--out", str(root / objective)])
    return root


def test_resume_refuses_changed_flags_but_allows_longer_runs(task, tmp_path):
    sft.main(sft_args(task, tmp_path / "run", "--max-steps", "2"))
    with pytest.raises(ValueError, match=r"--lr: 2e-05 in the checkpoint, 0\.001 now"):
        sft.main(sft_args(task, tmp_path / "run", "--max-steps", "3", "--lr", "1e-3"))
    with pytest.raises(ValueError, match=r"--batch-size: 8 in the checkpoint, 16 now"):
        sft.main(sft_args(task, tmp_path / "run", "--max-steps", "3", "--batch-size", "16"))
    sft.main(sft_args(task, tmp_path / "run", "--max-steps", "3"))  # extending a run is allowed
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_reused_out_of_another_objective_is_refused(task, trained, tmp_path):
    shutil.copytree(trained / "reward", tmp_path / "copy")
    with pytest.raises(ValueError, match=r"copy holds a reward-model run \(train_score\.py --objective reward\), not "
                                         r"a cost-model run \(train_score\.py --objective cost\)"):
        train_score.main(["--objective", "cost", "--model", str(trained / "sft" / "model"),
                          "--data", f"{task.preference_train}:64", "--eval-data", f"{task.preference_eval}:16",
                          "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--out", str(tmp_path / "copy")])
    assert json.loads((tmp_path / "copy" / "model" / "config.json").read_text())["score_stats"]["objective"] == "reward"


def test_missing_latest_resumes_from_the_newest_step(task, tmp_path):
    sft.main(sft_args(task, tmp_path / "run", "--max-steps", "3"))
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    shutil.rmtree(tmp_path / "run" / "model")
    sft.main(sft_args(task, tmp_path / "run", "--max-steps", "4"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # continued, not restarted
    (tmp_path / "run" / "checkpoints" / "latest").write_text("")
    with pytest.raises(FileNotFoundError, match="latest is empty"):
        sft.main(sft_args(task, tmp_path / "run", "--max-steps", "5"))


def ppo(trained, task, out, *extra):
    return ["--actor", str(trained / "sft" / "model"), "--reward-model", str(trained / "reward" / "model"),
            "--cost-model", str(trained / "cost" / "model"), "--synthetic-dir", str(task.dir), "--batch-size", "8",
            "--micro-batch-size", "4", "--max-new-tokens", "8", "--max-steps", "1", "--out", str(out), *extra]


@pytest.mark.parametrize("swap, message", [
    ("lm_as_reward", "is a language model, not a trained reward model"),
    ("swapped", "was trained as a cost model, but is given as the reward model"),
])
def test_wrong_score_models_are_refused(task, trained, tmp_path, swap, message):
    args = ppo(trained, task, tmp_path / "ppo")
    if swap == "lm_as_reward":
        args[args.index("--reward-model") + 1] = str(trained / "sft" / "model")
    else:
        args[args.index("--reward-model") + 1] = str(trained / "cost" / "model")
        args[args.index("--cost-model") + 1] = str(trained / "reward" / "model")
    with pytest.raises(ValueError, match=message):
        ppo_lag.main(args)
    if swap == "swapped":
        with pytest.raises(ValueError, match=message):
            evaluate.main(["--models", str(trained / "sft" / "model"), "--reward-model", str(trained / "cost" / "model"),
                           "--synthetic-dir", str(task.dir), "--out", str(tmp_path / "eval")])


@pytest.mark.parametrize("flags", [["--max-steps", "0"], ["--max-steps", "-1"], ["--epochs", "0"], ["--lr", "nan"],
                                   ["--batch-size", "0"], ["--eval-every", "0"], ["--warmup-ratio", "1.5"]])
def test_impossible_flag_values_stop_at_parsing(task, tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(sft_args(task, tmp_path / "run", *flags))
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_lambda_init_must_be_positive(trained, task, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ppo_lag.main(ppo(trained, task, tmp_path / "ppo", "--lambda-init", "0"))
    assert "--lambda-init" in capsys.readouterr().err


def test_grad_clip_zero_means_no_clipping(task, tmp_path):
    sft.main(sft_args(task, tmp_path / "run", "--max-steps", "1", "--grad-clip", "0"))
    start = Transformer(ModelArgs.from_name("tiny", vocab_size=1024))
    start.init_weights(seed=0)  # what --model tiny starts from (--seed 0)
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    moved = (after["model.layers.0.self_attn.q_proj.weight"] - start.layers[0].attention.wq.weight.detach()).abs().max()
    assert moved > 1e-6  # a clip at 0 would have zeroed every update
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["grad_norm"] > 0


def test_non_finite_weights_stop_before_the_update(task, trained, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(trained / "sft" / "model", broken)
    model = hf_io.load_pretrained(broken)
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    hf_io.save_pretrained(model, broken, extra_files=[trained / "sft" / "model" / "tokenizer.model"])
    args = sft_args(task, tmp_path / "run", "--max-steps", "2")
    args[args.index("--model") + 1] = str(broken)
    with pytest.raises(FloatingPointError, match="optimiser step 1"):
        sft.main(args)


def test_empty_or_fully_dropped_data(task, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = sft_args(task, tmp_path / "a", "--max-steps", "1")
    args[args.index("--data") + 1] = str(empty)
    with pytest.raises(ValueError, match="no training dialogues left"):
        sft.main(args)
    with pytest.raises(ValueError, match="no training dialogues left"):
        sft.main(sft_args(task, tmp_path / "b", "--max-steps", "1", "--max-length", "8"))


def test_missing_model_and_small_vocabulary(trained, task, tmp_path):
    args = sft_args(task, tmp_path / "run", "--max-steps", "1")
    args[args.index("--model") + 1] = "/nonexistent/llama"
    with pytest.raises(FileNotFoundError, match="/nonexistent/llama: no such checkpoint directory"):
        sft.main(args)
    small = hf_io.load_pretrained(trained / "sft" / "model")
    small_args = small.args.__class__(**{**small.args.__dict__, "vocab_size": 512})
    small = Transformer(small_args)
    small.init_weights(seed=0)
    hf_io.save_pretrained(small, tmp_path / "small", extra_files=[trained / "sft" / "model" / "tokenizer.model"])
    args = ppo(trained, task, tmp_path / "ppo")
    args[args.index("--actor") + 1] = str(tmp_path / "small")
    with pytest.raises(ValueError, match=r"has 1024 ids but .*small only embeds 512"):
        ppo_lag.main(args)


def test_damaged_checkpoint_files_are_named(task, tmp_path):
    sft.main(sft_args(task, tmp_path / "run", "--max-steps", "2"))
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    # The sharded layout (checkpoint.py): <name>/ and <name>.optim/ hold each rank's safetensors shards.
    optim = step / "model.optim" / "shard-00001-model-00001-of-00001.safetensors"
    saved = optim.read_bytes()
    optim.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"model\.optim/shard-00001-model-00001-of-00001\.safetensors: cannot be "
                                         r"read.*older step directory"):
        sft.main(sft_args(task, tmp_path / "run", "--max-steps", "3"))
    optim.write_bytes(saved)
    weights = step / "model" / "shard-00001-model-00001-of-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model/shard-00001-model-00001-of-00001\.safetensors: .*not a readable "
                                         r"safetensors file"):
        sft.main(sft_args(task, tmp_path / "run", "--max-steps", "3"))


def test_evaluate_refuses_empty_prompts_and_a_missing_gpu(trained, task, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    common = ["--models", str(trained / "sft" / "model"), "--out", str(tmp_path / "eval")]
    with pytest.raises(ValueError, match="no evaluation prompts in .*empty.jsonl left"):
        evaluate.main([*common, "--prompts", str(empty)])
    with pytest.raises(SystemExit):
        evaluate.main([*common, "--samples-per-prompt", "0"])
    assert "--samples-per-prompt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cuda: torch .* sees no CUDA GPU"):
            sft.main(sft_args(task, tmp_path / "run", "--max-steps", "1", "--device", "cuda"))


def test_warnings_for_tiny_data_and_an_off_scale_threshold(trained, task, tmp_path, capsys):
    args = sft_args(task, tmp_path / "run", "--max-steps", "1")
    args[args.index("--data") + 1] = f"{task.sft_train}:6"
    sft.main(args)
    assert "warning: only 6 training dialogues for batches of 8" in capsys.readouterr().out
    ppo_lag.main(ppo(trained, task, tmp_path / "ppo", "--threshold", "-100"))
    assert "warning: the threshold -100.0 lies outside the 5-95% range of these costs: lambda will only grow" in \
        capsys.readouterr().out


def test_recipe_fills_only_the_flags_left_unset(monkeypatch):
    """--recipe fills the flags left at None; a flag given as 0 (--warmup-ratio 0, --weight-decay 0) is kept."""
    import argparse

    import cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    recipe = {"warmup_ratio": 0.03, "weight_decay": 0.1, "lr": 1e-3, "batch_size": 64, "micro_batch_size": 4}
    args = argparse.Namespace(recipe=None, report_to=None, warmup_ratio=0.0, weight_decay=0, lr=None, batch_size=8,
                              micro_batch_size=None, save_every=None)
    cli.apply_recipe(args, {"tiny": recipe, "authors": {}}, data_given=False)
    assert vars(args) == {"recipe": "tiny", "report_to": None, "warmup_ratio": 0.0, "weight_decay": 0, "lr": 1e-3,
                          "batch_size": 8, "micro_batch_size": 4, "save_every": 100}


def test_help_shows_each_flags_default(capsys):
    """--help says what a flag left unset does: its default (SAFE_RLHF.md's PPO values, by hand) or the
    recipe's values, never both and never 'None'."""
    with pytest.raises(SystemExit):
        ppo_lag.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces
    text = text[text.index("options:"):]  # the flags' lines, not the usage block
    for flag, shown in (("--clip-eps CLIP_EPS PPO ratio clip", "0.2"), ("--gamma GAMMA discount", "1.0"),
                        ("--gae-lambda GAE_LAMBDA GAE lambda", "0.95"), ("--seed SEED", "0"),
                        ("--lambda-update-delay LAMBDA_UPDATE_DELAY", "0"), ("--device DEVICE", "auto")):
        start = text.index(flag)
        assert f"(default: {shown})" in text[start:text.index("--", start + len(flag))], flag
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    lr = text[text.index("--lr LR"):text.index("--weight-decay")]
    assert "[tiny: 0.0002 | authors': 1e-05]" in lr and "(default:" not in lr  # the recipe's, not a default
    # ppo_lag.py's --max-length bounds the prompts (data/README.md: longer prompts are dropped, never cut)
    assert "--max-length MAX_LENGTH prompt tokens" in text and "--eval-every" not in text  # PPO has no eval set
