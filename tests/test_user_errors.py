"""The user-error table: what a researcher gets wrong by accident (a bad data line, a missing field,
conflicting flags, a wrong or damaged checkpoint, an unsupported model) prints one or two lines
that name the culprit and the fix, exits with a non-zero status, and prints no traceback. Each case
runs a script's main() through cli.run, the wrapper every script's __main__ uses; one case
runs as a real process, and one under torchrun (the message once, from rank 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import evaluate
import pipeline
import ppo_lag
import sft
import train_score
import hf_io
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=1024, hidden_dim=64, max_seq_len=128)


@pytest.fixture(scope="module")
def models(synthetic_data, tmp_path_factory):
    """Untrained tiny checkpoints: a policy, a reward model and a cost model (with their saved
    objectives), each with the synthetic task's tokenizer beside it."""
    root = tmp_path_factory.mktemp("user_errors")
    tokenizer = [synthetic_data.tokenizer]
    policy = Transformer(TINY)
    policy.init_weights(seed=0)
    hf_io.save_pretrained(policy, root / "sft", extra_files=tokenizer)
    for objective in ("reward", "cost"):
        score = Transformer(TINY, head="score")
        score.init_weights(seed=1)
        score.score_stats = {"objective": objective}
        hf_io.save_pretrained(score, root / objective, extra_files=tokenizer)
    return root


def write(path, text):
    path.write_text(text)
    return str(path)


def pku_row(**overrides):
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
           "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}
    return json.dumps({**row, **overrides})


def sft_run(task, tmp_path, *extra):
    return lambda: sft.main(["--model", "tiny", "--tokenizer", str(task.tokenizer), "--data", f"{task.sft_train}:16",
                             "--eval-data", f"{task.sft_eval}:4", "--batch-size", "8", "--micro-batch-size", "4",
                             "--max-steps", "1", "--out", str(tmp_path / "sft_run"), *extra])


def ppo_run(task, models, tmp_path, *extra):
    argv = ["--actor", str(models / "sft"), "--reward-model", str(models / "reward"), "--cost-model",
            str(models / "cost"), "--synthetic-dir", str(task.dir), "--batch-size", "4", "--micro-batch-size", "2",
            "--max-new-tokens", "4", "--max-steps", "1", "--out", str(tmp_path / "ppo_run")]
    flags = dict(zip(argv[::2], argv[1::2]))
    flags.update(dict(zip(extra[::2], extra[1::2])))
    return lambda: ppo_lag.main([x for kv in flags.items() for x in kv])


def case_missing_data_file(task, models, tmp_path):
    return sft_run(task, tmp_path, "--data", "/nonexistent/alpaca.jsonl"), "data file not found: /nonexistent/alpaca.jsonl"


def case_malformed_json_line(task, models, tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    return sft_run(task, tmp_path, "--data", path), "bad.jsonl, line 2: malformed JSON"


def case_bad_preference_field(task, models, tmp_path):
    path = write(tmp_path / "pku.jsonl", pku_row() + "\n" + pku_row(better_response_id=2) + "\n")
    run = lambda: train_score.main(["--model", str(models / "sft"), "--data", path, "--out", str(tmp_path / "rm")])  # noqa: E731
    return run, "pku.jsonl, line 2, field 'better_response_id': expected 0 or 1, got 2"


def case_missing_field(task, models, tmp_path):
    path = write(tmp_path / "pku.jsonl", pku_row() + "\n" + json.dumps({"prompt": "p", "response_0": "a"}) + "\n")
    run = lambda: train_score.main(["--model", str(models / "sft"), "--data", path, "--out", str(tmp_path / "rm")])  # noqa: E731
    return run, "pku.jsonl, line 2, field 'response_1': missing"


def case_flag_conflict_before_loading(task, models, tmp_path):
    # The data file does not exist either: the flags are checked first, before anything is read.
    return (sft_run(task, tmp_path, "--batch-size", "8", "--micro-batch-size", "16", "--data", "/nonexistent.jsonl"),
            "--batch-size 8 must be a multiple of --micro-batch-size 16")


def case_missing_model(task, models, tmp_path):
    return sft_run(task, tmp_path, "--model", "/nonexistent/llama"), "/nonexistent/llama: no such checkpoint directory"


def case_unsupported_architecture(task, models, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    write(gpt2 / "config.json", json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}))
    return sft_run(task, tmp_path, "--model", str(gpt2)), "model_type 'gpt2'"


def case_config_not_json(task, models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    write(broken / "config.json", "{not json")
    return sft_run(task, tmp_path, "--model", str(broken)), "config.json is not valid JSON"


def case_pickle_only_checkpoint(task, models, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((models / "sft" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return sft_run(task, tmp_path, "--model", str(pickled)), "holds only pickle weights (.bin/.pth); convert them to safetensors"


def case_damaged_weights(task, models, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (models / "sft").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    return sft_run(task, tmp_path, "--model", str(damaged)), "damaged/model.safetensors: not a readable safetensors file"


def case_language_model_as_reward_model(task, models, tmp_path):
    return (ppo_run(task, models, tmp_path, "--reward-model", str(models / "sft")),
            "is a language model, not a trained score model")


def case_swapped_score_models(task, models, tmp_path):
    return (ppo_run(task, models, tmp_path, "--reward-model", str(models / "cost"), "--cost-model", str(models / "reward")),
            "was trained as a cost model, but is given as the reward model")


def case_resume_with_other_flags(task, models, tmp_path):
    sft_run(task, tmp_path, "--save-every", "1")()
    return sft_run(task, tmp_path, "--save-every", "1", "--lr", "0.5"), "--lr: 2e-05 in the checkpoint, 0.5 now"


def case_chat_template_without_one(task, models, tmp_path):
    return sft_run(task, tmp_path, "--template", "chat"), str(task.tokenizer)


def case_tokenizer_larger_than_the_model(task, models, tmp_path):
    small = Transformer(ModelArgs(**{**TINY.__dict__, "vocab_size": 512}))
    small.init_weights(seed=0)
    hf_io.save_pretrained(small, tmp_path / "small", extra_files=[task.tokenizer])
    return sft_run(task, tmp_path, "--model", str(tmp_path / "small")), "has 1024 ids but"


def case_ptx_without_data(task, models, tmp_path):
    return (ppo_run(task, models, tmp_path, "--prompts", f"{task.ppo_prompts}:8"),
            "needs --ptx-data (SFT files, e.g. sft.py's --data), or pass --ptx-coeff 0")


def case_unlabelled_eval_prompts(task, models, tmp_path):
    path = write(tmp_path / "red.jsonl", json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    run = lambda: evaluate.main(["--models", str(models / "sft"), "--prompts", path, "--out", str(tmp_path / "e")])  # noqa: E731
    return run, "red.jsonl: the judge's metrics need a 'harmful' field on every prompt"


def case_different_templates(task, models, tmp_path):
    config = json.loads((models / "reward" / "config.json").read_text())
    chat_rm = tmp_path / "chat_rm"
    chat_rm.mkdir()
    for f in (models / "reward").iterdir():
        (chat_rm / f.name).write_bytes(f.read_bytes())
    write(chat_rm / "config.json", json.dumps({**config, "template": "chat"}))
    return ppo_run(task, models, tmp_path, "--reward-model", str(chat_rm)), "was trained with --template chat"


def case_no_gpu(task, models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return sft_run(task, tmp_path, "--device", "cuda"), "--device cuda: torch"


def case_empty_data(task, models, tmp_path):
    return sft_run(task, tmp_path, "--data", write(tmp_path / "empty.jsonl", "")), "no training dialogues left"


CASES = {name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_message(name, synthetic_data, models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAFE_RLHF_DEBUG", raising=False)
    torch.set_num_threads(1)
    run, expected = CASES[name](synthetic_data, models, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(run)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6, err


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15


def test_bugs_keep_their_traceback(monkeypatch):
    def buggy():
        return torch.zeros(2) @ torch.zeros(3)  # an operation that fails in our code: a bug, not a user error

    with pytest.raises(RuntimeError):
        cli.run(buggy)
    monkeypatch.setenv("SAFE_RLHF_DEBUG", "1")
    with pytest.raises(ValueError, match="mine"):
        cli.run(lambda: (_ for _ in ()).throw(ValueError("mine")))


def test_pipeline_real_data_without_eval_prompts(tmp_path, synthetic_data):
    with pytest.raises(SystemExit, match="real data needs --eval-prompts"):
        cli.run(lambda: pipeline.main(["--out", str(tmp_path), "--prompts", str(synthetic_data.ppo_prompts)]))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_as_a_process(tmp_path, synthetic_data, nproc):
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n')
    script = [str(ROOT / "sft.py"), "--model", "tiny", "--tokenizer", str(synthetic_data.tokenizer), "--data", bad,
              "--batch-size", "4", "--micro-batch-size", "2", "--out", str(tmp_path / "run")]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    env.pop("SAFE_RLHF_DEBUG", None)
    result = subprocess.run([*launcher, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = "bad.jsonl, line 2, field 'prompt': expected a string, got 3"
    assert (result.stdout + result.stderr).count(message) == 1, result.stderr[-3000:]
    if nproc == 1:  # under torchrun the launcher adds its own report of the failed ranks
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
