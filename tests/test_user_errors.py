"""The user-error table: what a researcher gets wrong by accident (a bad data line, field, encoding or
compression, conflicting or out-of-range flags, a wrong, damaged or mistyped checkpoint or config, bad
tokenizer files, an output directory that is a file or cannot be written, another stage's output
directory, an odd launch environment, a Ctrl-C, a full disk) prints one or two lines that name the
culprit and the fix, exits with status 2, prints no traceback, and leaves every file that existed
before byte for byte as it was (hashed before and after). Each case runs a script's main() through
cli.run, the wrapper every script's __main__ uses; one case runs as a real process, and one under
torchrun (the message once, from rank 0)."""

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import cli
import evaluate
import pipeline
import ppo_lag
import sft
import train_score
import training
import hf_io
from model import ModelArgs, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizers import write_llama3_folder  # noqa: E402
from test_checkpoint import full_disk  # noqa: E402

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


def case_stage_out_folder_as_model(task, models, tmp_path):
    # sft.py --out runs/sft writes the model to runs/sft/model; the --out folder itself is the easy mistake
    out = tmp_path / "sft_out"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(models / "sft", out / "model")
    return (sft_run(task, tmp_path, "--model", str(out)),
            f"{out}/config.json is missing: not a Hugging Face-format checkpoint (a stage's --out folder? its "
            f"product is {out / 'model'})")


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
            "sft is a language model, not a trained reward model: pass train_score.py --objective reward's product")


def case_swapped_score_models(task, models, tmp_path):
    return (ppo_run(task, models, tmp_path, "--reward-model", str(models / "cost"), "--cost-model", str(models / "reward")),
            "was trained as a cost model, but is given as the reward model")


def case_resume_with_other_flags(task, models, tmp_path):
    sft_run(task, tmp_path, "--save-every", "1")()
    return sft_run(task, tmp_path, "--save-every", "1", "--lr", "0.5"), "--lr: 2e-05 in the checkpoint, 0.5 now"


def case_resume_with_edited_data(task, models, tmp_path):
    # The same flags, but the data file was edited since the checkpoint: its steps would continue on other examples.
    data = tmp_path / "sft.jsonl"
    rows = task.sft_train.read_text().splitlines()[:16]
    data.write_text("\n".join(rows) + "\n")
    sft_run(task, tmp_path, "--data", str(data), "--save-every", "1")()
    edited = json.loads(rows[5])
    edited["output"] = edited["output"] + " And one more sentence."
    data.write_text("\n".join(rows[:5] + [json.dumps(edited)] + rows[6:]) + "\n")
    return (sft_run(task, tmp_path, "--data", str(data), "--save-every", "1", "--max-steps", "2"),
            f"{tmp_path / 'sft_run' / 'checkpoints' / 'step_00000001'} was trained on other data: the train set(s) "
            "now tokenize to other examples than the checkpoint's")


def case_ppo_resume_with_other_prompts(task, models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = task.ppo_prompts.read_text().splitlines()[:8]
    prompts.write_text("\n".join(rows) + "\n")
    ppo_run(task, models, tmp_path, "--prompts", str(prompts), "--ptx-coeff", "0", "--save-every", "1")()
    prompts.write_text("\n".join(rows[:7] + rows[:1]) + "\n")  # the last prompt replaced by the first
    return (ppo_run(task, models, tmp_path, "--prompts", str(prompts), "--ptx-coeff", "0", "--save-every", "1",
                    "--max-steps", "2"),
            "was trained on other data: the prompts set(s) now tokenize to other examples")


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
    return (ppo_run(task, models, tmp_path, "--reward-model", str(chat_rm), "--template", "safe_rlhf"),
            "was trained with --template chat")


def case_no_gpu(task, models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return sft_run(task, tmp_path, "--device", "cuda"), "--device cuda: torch"


def case_empty_data(task, models, tmp_path):
    return sft_run(task, tmp_path, "--data", write(tmp_path / "empty.jsonl", "")), "no training dialogues left"


def copy_model(models, name, tmp_path, **config_changes):
    """A copy of one of the tiny checkpoints, its config.json changed (a key set to None is removed)."""
    target = tmp_path / f"{name}_copy"
    shutil.copytree(models / name, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    write(target / "config.json", json.dumps({k: v for k, v in config.items() if v is not None}))
    return target


def tokenizer_dir(task, tmp_path, **files):
    """The synthetic task's tokenizer.model in a folder of its own, with `files` (name -> text or bytes) beside it."""
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(task.tokenizer, folder / "tokenizer.model")
    for name, content in files.items():
        target = folder / name.replace("__", ".")
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return str(folder)


def sft_out(task, tmp_path):
    """A finished 1-step SFT run in tmp_path/sft_run (checkpoint and product), for the cases that misuse it."""
    sft_run(task, tmp_path, "--save-every", "1")()
    return tmp_path / "sft_run"


# -- data files: encodings, compression, text, shares ----------------------------------------------------------

def case_latin1_data_file(task, models, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9?", "response": "oui"}\n'.encode("latin-1"))
    return sft_run(task, tmp_path, "--data", str(path)), "latin1.jsonl, line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def case_damaged_gzip_data_file(task, models, tmp_path):
    path = tmp_path / "cut.jsonl"  # gzip under a .jsonl name (read as gzip), cut short by a failed download
    path.write_bytes(gzip.compress(b'{"prompt": "a", "response": "b"}\n' * 50)[:30])
    return sft_run(task, tmp_path, "--data", str(path)), "cut.jsonl: a damaged gzip file"


def case_zstd_data_file(task, models, tmp_path):
    path = tmp_path / "train.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(40))
    return sft_run(task, tmp_path, "--data", str(path)), "train.jsonl.zst is zstd-compressed, which is not read here: unpack it (zstd -d"


def case_lone_surrogate_escape(task, models, tmp_path):
    path = write(tmp_path / "emoji.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "smile \\ud83d", "response": "b"}\n')
    return (sft_run(task, tmp_path, "--data", path),
            "emoji.jsonl, line 2, field 'prompt': the escape \\ud83d at character 6 is half of a UTF-16 surrogate pair")


def case_data_directory(task, models, tmp_path):
    return sft_run(task, tmp_path, "--data", str(tmp_path)), f"{tmp_path} is a directory: name the data files in it"


def case_fraction_above_one(task, models, tmp_path):
    return sft_run(task, tmp_path, "--data", f"{task.sft_train}:1.5"), "a fraction must be in (0, 1]"


def case_more_rows_than_the_file(task, models, tmp_path):
    path = write(tmp_path / "two.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    return sft_run(task, tmp_path, "--data", f"{path}:100"), "two.jsonl: asks for 100 rows but has only 2 usable ones"


# -- config.json: types and ranges of the fields we read --------------------------------------------------------

def case_config_string_for_int(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path, hidden_size="32")
    return (sft_run(task, tmp_path, "--model", str(model)),
            "sft_copy/config.json: 'hidden_size' must be a positive integer, got \"32\"; fix it in config.json")


def case_config_zero_layers(task, models, tmp_path):
    model = copy_model(models, "reward", tmp_path, num_hidden_layers=0)
    return ppo_run(task, models, tmp_path, "--reward-model", str(model)), "'num_hidden_layers' must be a positive integer, got 0"


def case_config_heads_do_not_divide(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path, num_attention_heads=3, num_key_value_heads=None, head_dim=None)
    return sft_run(task, tmp_path, "--model", str(model)), "hidden_size 32 is not a multiple of num_attention_heads 3"


def case_config_kv_heads_do_not_divide(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path, num_key_value_heads=3)
    return sft_run(task, tmp_path, "--model", str(model)), "num_attention_heads 2 is not a multiple of num_key_value_heads 3"


def case_config_unsupported_rope_scaling(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    return sft_run(task, tmp_path, "--model", str(model)), "rope_scaling type 'yarn' is not supported"


def case_config_string_for_bool(task, models, tmp_path):
    model = copy_model(models, "cost", tmp_path, tie_word_embeddings="false")
    return (ppo_run(task, models, tmp_path, "--cost-model", str(model)),
            "cost_copy/config.json: 'tie_word_embeddings' must be true or false, got \"false\"")


def case_config_without_vocab_size(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path, vocab_size=None)
    return sft_run(task, tmp_path, "--model", str(model)), "sft_copy/config.json has no 'vocab_size'"


def case_config_shape_disagrees_with_weights(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path, intermediate_size=96)
    return sft_run(task, tmp_path, "--model", str(model)), "has shape (32, 64), expected (32, 96) from config.json"


def case_folder_without_weights(task, models, tmp_path):
    model = copy_model(models, "sft", tmp_path)
    (model / "model.safetensors").unlink()
    return sft_run(task, tmp_path, "--model", str(model)), "has neither model.safetensors nor model.safetensors.index.json"


# -- tokenizer files --------------------------------------------------------------------------------------------

def case_tokenizer_config_not_json(task, models, tmp_path):
    folder = tokenizer_dir(task, tmp_path, tokenizer_config__json='{"eos_token": "</s>",')
    return sft_run(task, tmp_path, "--tokenizer", folder), "tok/tokenizer_config.json: malformed JSON"


def case_not_a_sentencepiece_model(task, models, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00garbage" * 10)
    return sft_run(task, tmp_path, "--tokenizer", str(path)), "tokenizer.model is not a valid sentencepiece model"


def case_chat_template_not_utf8(task, models, tmp_path):
    folder = tokenizer_dir(task, tmp_path, chat_template__jinja="{{ 'caf\xe9' }}".encode("latin-1"))
    return sft_run(task, tmp_path, "--tokenizer", folder), "tok/chat_template.jinja: not UTF-8 text"


def case_chat_template_syntax_error(task, models, tmp_path):
    folder = write_llama3_folder(tmp_path / "llama3")
    write(Path(folder) / "chat_template.jinja", "{% for message in messages %}{{ message['content'] }}")
    return (sft_run(task, tmp_path, "--tokenizer", str(folder), "--template", "chat"),
            "the chat template of " + str(folder))


def case_generation_eos_outside_vocabulary(task, models, tmp_path):
    folder = tokenizer_dir(task, tmp_path, generation_config__json='{"eos_token_id": [2, 99999]}')
    return sft_run(task, tmp_path, "--tokenizer", folder), "generation_config.json: eos_token_id [2, 99999] is not an id of"


# -- checkpoints and other stages' folders ----------------------------------------------------------------------

def with_other_tokenizer(model: Path, dest: Path) -> str:
    """A copy of `model` (trained on the synthetic task's sentencepiece vocabulary) whose folder holds a
    Llama-3-style BPE tokenizer instead: what a score model or policy from another base model looks like.
    Its embedding is as large as the run's vocabulary, so nothing but the tokenizer files tells them apart."""
    write_llama3_folder(dest)
    for f in model.iterdir():
        if f.name not in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json"):
            (dest / f.name).write_bytes(f.read_bytes())
    return str(dest)


def case_reward_model_of_another_tokenizer(task, models, tmp_path):
    # Before: PPO ran, the reward model scoring sentencepiece ids as if they were its own BPE ids.
    other = with_other_tokenizer(models / "reward", tmp_path / "llama3_rm")
    return (ppo_run(task, models, tmp_path, "--reward-model", other),
            f"{other} was trained with another tokenizer than this run's {models / 'sft' / 'tokenizer.model'}")


def case_evaluate_policies_of_different_tokenizers(task, models, tmp_path):
    # Before: the second policy's answers were sampled and decoded with the first one's tokenizer.
    other = with_other_tokenizer(models / "sft", tmp_path / "llama3_policy")
    run = lambda: evaluate.main(["--models", str(models / "sft"), other, "--synthetic-dir", str(task.dir),  # noqa: E731
                                 "--max-new-tokens", "2", "--out", str(tmp_path / "e")])
    return run, f"{other} was trained with another tokenizer than this run's"


def case_arena_cost_model_of_another_tokenizer(task, models, tmp_path):
    other = with_other_tokenizer(models / "cost", tmp_path / "llama3_cm")
    run = lambda: evaluate.main(["--arena", str(models / "sft"), str(models / "sft"), "--reward-model",  # noqa: E731
                                 str(models / "reward"), "--cost-model", other, "--synthetic-dir", str(task.dir),
                                 "--max-new-tokens", "2", "--out", str(tmp_path / "e")])
    return run, f"{other} was trained with another tokenizer than this run's"


def case_another_stages_out(task, models, tmp_path):
    out = sft_out(task, tmp_path)
    return (ppo_run(task, models, tmp_path, "--out", str(out)),
            f"{out} holds an SFT run (sft.py), not a PPO-Lagrangian run (ppo_lag.py --algo ppo_lag): pass another --out")


def case_damaged_state_json(task, models, tmp_path):
    out = sft_out(task, tmp_path)
    write(out / "checkpoints" / "step_00000001" / "state.json", '{"step": 1, ')
    return sft_run(task, tmp_path, "--save-every", "1"), "step_00000001/state.json: cannot be read"


def case_latest_names_a_missing_step(task, models, tmp_path):
    out = sft_out(task, tmp_path)
    write(out / "checkpoints" / "latest", "step_00000009\n")
    return sft_run(task, tmp_path, "--save-every", "1"), "step_00000009, which is not a complete checkpoint"


def case_score_model_as_policy(task, models, tmp_path):
    run = lambda: evaluate.main(["--models", str(models / "reward"), "--out", str(tmp_path / "e")])  # noqa: E731
    return run, f"{models / 'reward'} holds a score model (a reward or cost model"


def case_score_model_as_actor(task, models, tmp_path):
    return ppo_run(task, models, tmp_path, "--actor", str(models / "cost")), f"{models / 'cost'} holds a score model"


# -- flags ------------------------------------------------------------------------------------------------------

def case_eval_fraction_as_percent(task, models, tmp_path):
    return (sft_run(task, tmp_path, "--eval-fraction", "5"),
            "argument --eval-fraction: must be a share in [0, 1), got 5 (5% is 0.05)")


def case_top_p_zero(task, models, tmp_path):
    return ppo_run(task, models, tmp_path, "--top-p", "0"), "argument --top-p: must be in (0, 1], got 0"


def case_gamma_above_one(task, models, tmp_path):
    return ppo_run(task, models, tmp_path, "--gamma", "1.5"), "argument --gamma: must be in [0, 1], got 1.5"


def case_nan_threshold(task, models, tmp_path):
    return ppo_run(task, models, tmp_path, "--threshold", "nan"), "argument --threshold: must be a finite number, got nan"


def case_negative_temperature(task, models, tmp_path):
    run = lambda: evaluate.main(["--models", str(models / "sft"), "--temperature", "-1"])  # noqa: E731
    return run, "argument --temperature: must be 0 or more, got -1"


# -- the output directory ---------------------------------------------------------------------------------------

def case_out_is_a_file(task, models, tmp_path):
    out = write(tmp_path / "results.txt", "notes\n")
    return sft_run(task, tmp_path, "--out", out), f"--out {out} is a file, not a directory"


def case_out_under_a_file(task, models, tmp_path):
    notes = write(tmp_path / "notes.txt", "notes\n")
    return (ppo_run(task, models, tmp_path, "--out", f"{notes}/ppo"),
            f"--out {notes}/ppo lies under {notes}, which is a file, not a directory")


def case_out_not_writable(task, models, tmp_path):
    if os.geteuid() == 0:  # root writes through any permission bits: a read-only file system instead
        out = "/sys/safe_rlhf_out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = str(locked / "run")
    return sft_run(task, tmp_path, "--out", out), f"--out {out}: cannot write in"


def case_evaluate_out_is_a_file(task, models, tmp_path):
    out = write(tmp_path / "eval.json", "{}\n")
    run = lambda: evaluate.main(["--models", str(models / "sft"), "--out", out])  # noqa: E731
    return run, f"--out {out} is a file, not a directory"


# -- the environment --------------------------------------------------------------------------------------------

def in_env(run, **env):
    """`run` with these environment variables (and only while it runs: cli.run reads RANK afterwards)."""
    def patched():
        with mock.patch.dict(os.environ, env):
            run()
    return patched


def case_cuda_visible_devices_hides_the_gpus(task, models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (torch read CUDA_VISIBLE_DEVICES when CUDA started)")
    return in_env(sft_run(task, tmp_path, "--device", "cuda"), CUDA_VISIBLE_DEVICES="-1"), "CUDA_VISIBLE_DEVICES='-1'"


def case_more_ranks_than_gpus(task, models, tmp_path):
    run = in_env(sft_run(task, tmp_path, "--device", "cuda"), RANK="1", WORLD_SIZE="2", LOCAL_RANK="1",
                 CUDA_VISIBLE_DEVICES="0")

    def one_gpu():  # what torch reports on a node that shows one GPU
        with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                mock.patch.object(torch.cuda, "device_count", return_value=1):
            run()
    return one_gpu, "LOCAL_RANK 1 has no GPU of its own: this node shows 1 (CUDA_VISIBLE_DEVICES='0'"


def case_world_size_does_not_divide_the_batch(task, models, tmp_path):
    return (in_env(sft_run(task, tmp_path), WORLD_SIZE="3"),
            "--batch-size 8 must be a multiple of --micro-batch-size 4 x 3 rank(s) = 12: e.g. --batch-size 12")


def case_rank_without_world_size(task, models, tmp_path):
    return in_env(sft_run(task, tmp_path), RANK="0"), "RANK=0 is set but WORLD_SIZE is not: launch with torchrun"


# -- interrupted runs -------------------------------------------------------------------------------------------

def case_ctrl_c(task, models, tmp_path):
    sft_run(task, tmp_path, "--max-steps", "2", "--save-every", "2")()  # its checkpoint must outlive the Ctrl-C

    def interrupted():
        with mock.patch.object(training, "train_step", side_effect=KeyboardInterrupt):
            sft_run(task, tmp_path, "--max-steps", "4", "--save-every", "2")()
    return (interrupted, "interrupted at step 3 of 4 (sft); run the same command to resume from step 3 (the "
                         "checkpoint of step 2")


def case_disk_full_while_saving(task, models, tmp_path):
    out = sft_out(task, tmp_path)

    def filling_up():
        with full_disk(budget=2000):
            sft_run(task, tmp_path, "--save-every", "1", "--max-steps", "2")()
    # log.jsonl holds step 2 by then (a resume drops it); the checkpoints and the product are as they were
    return (filling_up, "No space left on device", [out / "checkpoints", out / "model"])


CASES = {name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}


def file_hashes(*roots) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for root in roots for f in sorted(Path(root).rglob("*")) if f.is_file()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_message(name, synthetic_data, models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAFE_RLHF_DEBUG", raising=False)
    torch.set_num_threads(1)
    run, expected, *watched = CASES[name](synthetic_data, models, tmp_path)
    watched = watched[0] if watched else [tmp_path, models, synthetic_data.dir]
    before = file_hashes(*watched)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(run)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6, err
    after = file_hashes(*watched)
    assert [f for f, digest in before.items() if after.get(f) != digest] == []  # earlier outputs untouched


def test_the_table_covers_every_kind_of_input():
    assert len(CASES) >= 66


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


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_run_in_the_same_out_stops(tmp_path, synthetic_data, nproc):
    """A run still writing to --out (torchrun killed, its workers not: they run in their own sessions) holds
    <out>/.run.lock; a second run there stops before loading anything, on every rank, naming the holder. Once
    the holder is gone (SIGKILL: the lock goes with its process), the same command runs."""
    out = tmp_path / "run"
    script = [str(ROOT / "sft.py"), "--model", "tiny", "--tokenizer", str(synthetic_data.tokenizer), "--data",
              str(synthetic_data.sft_train), "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "2",
              "--out", str(out)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch"}
    env.pop("SAFE_RLHF_DEBUG", None)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, fileio; fileio.lock_out_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(600)", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = subprocess.run([*launcher, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    message = f"{out} is in use by another run that is still running (pid {holder.pid} on {socket.gethostname()}, since"
    assert (result.stdout + result.stderr).count(message) == 1, result.stderr[-3000:]
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()
    if nproc == 1:
        result = subprocess.run([*launcher, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and (out / "model" / "config.json").is_file(), result.stderr[-3000:]


def test_launch_env_reads_each_variable(monkeypatch):
    # On the second node of a torchrun job the global rank and the local rank differ: the local one picks the GPU.
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.launch_env() == (5, 8, 1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert cli.launch_env() == (0, 1, 0)


def test_check_device_accepts_a_gpu_index():
    # --device cuda:1 names a GPU: on a machine without one it is the missing-GPU error, not an unknown device.
    training.check_device("cpu")
    if torch.cuda.is_available():
        training.check_device("cuda:0")
    else:
        with pytest.raises(RuntimeError, match="--device cuda:1: torch .* sees no CUDA GPU"):
            training.check_device("cuda:1")
    with pytest.raises(ValueError, match="--device mps: expected auto, cpu or cuda"):
        training.check_device("mps")


def test_check_out_dir_with_several_new_levels(tmp_path):
    # A new --out several folders deep is fine (and nothing is created yet); under a file it is said so.
    cli.check_out_dir(tmp_path / "runs" / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    notes = write(tmp_path / "notes.txt", "notes\n")
    with pytest.raises(NotADirectoryError, match=f"lies under {notes}, which is a file"):
        cli.check_out_dir(f"{notes}/a/b")


def test_config_bool_is_not_a_count(tmp_path):
    # JSON true is a Python int: "num_hidden_layers": true must not load as a 1-layer model.
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": True,
              "vocab_size": 97, "intermediate_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'num_hidden_layers' must be a positive integer, got true"):
        hf_io.read_config(tmp_path)


def test_sharded_checkpoint_with_a_missing_shard_names_it(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, hidden_dim=64))
    hf_io.save_pretrained(model, tmp_path / "ckpt", max_shard_size=20_000)
    shards = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    gone = tmp_path / "ckpt" / sorted(set(shards))[-1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"{gone} is listed in .*model.safetensors.index.json but missing"):
        hf_io.load_pretrained(tmp_path / "ckpt")
