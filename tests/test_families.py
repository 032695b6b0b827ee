"""Model families as users have them: Mistral (LLaMA layout, sliding window) and Qwen2 (q/k/v
biases, tied embeddings) against transformers' own classes on the same random weights; and each
family (and a tied LLaMA) through sft.py -> train_score.py -> ppo_lag.py from a bf16 checkpoint
saved by transformers with a Llama-3-style tokenizer.json, the product loaded back by transformers."""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tokenizers import write_llama3_folder  # noqa: E402
from test_model import assert_close_on_mask, hf_logits, left_padded_batch  # noqa: E402
from test_stages import log_of, run  # noqa: E402

import hf_io  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def hf_family_model(family: str, vocab_size: int, seed: int = 0, tied: bool = False):
    if family == "mistral":  # a window shorter than the test sequences, so that it matters
        config = transformers.MistralConfig(**COMMON, vocab_size=vocab_size, sliding_window=4,
                                            tie_word_embeddings=tied, rope_theta=1e6)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**COMMON, vocab_size=vocab_size, tie_word_embeddings=tied, rope_theta=1e6,
                                          use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**COMMON, vocab_size=vocab_size, tie_word_embeddings=tied)
        cls = transformers.LlamaForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb so a dropped one would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family, tied", [("mistral", False), ("qwen2", True), ("qwen2", False)])
def test_family_matches_transformers(tmp_path, family, tied):
    hf = hf_family_model(family, vocab_size=97, tied=tied)
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_io.load_pretrained(tmp_path / "hf").eval()
    assert ours.args.family == family and ours.args.qkv_bias == (family == "qwen2")
    assert ours.args.sliding_window == (4 if family == "mistral" else None)
    ids, mask = left_padded_batch(97, [11, 7, 3, 11], seed=1)  # longer than Mistral's window
    with torch.no_grad():
        assert_close_on_mask(ours(ids, mask), hf_logits(hf, ids, mask), mask)
    # Greedy generation, token for token (the window also applies through the KV cache).
    eos, pad, new = 2, 0, 12
    ours_out = ours.generate(ids, mask, max_new_tokens=new, temperature=0, eos_id=eos, pad_id=pad)
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(ours_out[:, :hf_out.shape[1]], hf_out)
    # What we save, transformers loads as the same family with the same logits.
    hf_io.save_pretrained(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == family and config["tie_word_embeddings"] == tied
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").float().eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert_close_on_mask(hf_logits(back, ids, mask), hf_logits(hf, ids, mask), mask)


def family_checkpoint(root: Path, family: str, tied: bool) -> Path:
    """A bf16 checkpoint as transformers 5 saves it, with a Llama-3-style tokenizer (tokenizer.json
    only, several EOS ids, a chat template) beside it."""
    folder = write_llama3_folder(root / f"{family}_base", vocab_size=600)
    vocab = transformers.AutoTokenizer.from_pretrained(folder).__len__()
    hf = hf_family_model(family, vocab_size=vocab, tied=tied)
    hf.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("family, tied", [("llama", True), ("mistral", False), ("qwen2", True)])
def test_family_through_every_stage(tmp_path, synthetic_data, family, tied):
    import ppo_lag
    import sft
    import train_score

    task = synthetic_data
    base = family_checkpoint(tmp_path, family, tied)
    small = ["--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--max-length", "128"]
    sft.main(["--model", str(base), "--data", f"{task.sft_train}:16", "--eval-data", f"{task.sft_eval}:4",
              "--out", str(tmp_path / "sft"), *small])
    for objective in ("reward", "cost"):
        train_score.main(["--objective", objective, "--model", str(tmp_path / "sft" / "model"),
                          "--data", f"{task.preference_train}:16", "--eval-data", f"{task.preference_eval}:8",
                          "--out", str(tmp_path / objective), *small])
    ppo_lag.main(["--actor", str(tmp_path / "sft" / "model"), "--reward-model", str(tmp_path / "reward" / "model"),
                  "--cost-model", str(tmp_path / "cost" / "model"), "--prompts", f"{task.ppo_prompts}:8",
                  "--ptx-data", f"{task.sft_train}:8", "--max-new-tokens", "6", "--out", str(tmp_path / "ppo"),
                  *small])
    actor = tmp_path / "ppo" / "actor"
    # A drop-in replacement of the input: its family, its dtype, its tokenizer and generation files.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (actor / name).is_file() == (base / name).is_file(), name
    config = json.loads((actor / "config.json").read_text())
    assert config["model_type"] == family and config["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(actor, attn_implementation="eager").float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(actor)
    tok.pad_token = "<|finetune_right_pad_id|>"  # Meta's configs set none
    ids = tok(["How do I bake bread?", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    ours = hf_io.load_pretrained(actor, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_on_mask(ours(ids.input_ids, ids.attention_mask),
                             hf_logits(hf, ids.input_ids, ids.attention_mask), ids.attention_mask)
    assert len(log_of(tmp_path / "ppo")) == 1


@pytest.mark.slow
def test_tied_embeddings_under_torchrun_and_resume(tmp_path, synthetic_data):
    # A tied Qwen2 checkpoint: 2 ranks against 1 process, and a 2-rank run resumed in one process.
    task = synthetic_data
    base = family_checkpoint(tmp_path, "qwen2", tied=True)

    def sft_args(out, steps):
        return ["--model", str(base), "--data", f"{task.sft_train}:32", "--eval-data", f"{task.sft_eval}:4",
                "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", str(steps), "--save-every", "1",
                "--max-length", "128", "--out", str(out)]

    run("sft.py", sft_args(tmp_path / "one", 2))
    run("sft.py", sft_args(tmp_path / "two", 2), nproc=2)
    run("sft.py", sft_args(tmp_path / "resumed", 1), nproc=2)
    run("sft.py", sft_args(tmp_path / "resumed", 2))
    one, two, resumed = (log_of(tmp_path / name) for name in ("one", "two", "resumed"))
    for a, b, c in zip(one, two, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["loss"] == pytest.approx(c["loss"], rel=1e-5)
    for name in ("one", "two", "resumed"):
        saved = hf_io.load_pretrained(tmp_path / name / "model")
        assert saved.output.weight is saved.tok_embeddings.weight
    a, b = (hf_io.load_pretrained(tmp_path / name / "model").state_dict() for name in ("one", "resumed"))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-3), key  # bf16 products


def test_generation_stops_at_any_of_several_eos_ids(tmp_path):
    # Llama-3 ends a turn with <|eot_id|> and a text with <|end_of_text|>: either ends a row, as in
    # transformers' generate with a list of eos ids. Two frequent tokens of this model stand in.
    hf = hf_family_model("llama", vocab_size=31, seed=3)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch(31, [6, 4, 6, 3, 5, 6], seed=2)
    free = ours.generate(ids, mask, max_new_tokens=10, temperature=0)[:, ids.shape[1]:]
    eos = tuple(int(t) for t in free.flatten().bincount(minlength=31).topk(2).indices)
    ours_out = ours.generate(ids, mask, max_new_tokens=10, temperature=0, eos_id=eos, pad_id=0)
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         eos_token_id=list(eos), pad_token_id=0)
    assert torch.equal(ours_out[:, :hf_out.shape[1]], hf_out)
    from model import generation_mask
    response = generation_mask(ours_out, mask, eos)[:, ids.shape[1]:]
    stopped = [row for row in range(len(ids)) if set(ours_out[row, ids.shape[1]:].tolist()) & set(eos)]
    assert len(stopped) >= 2 and all(response[row].sum() < 10 for row in stopped)


def test_config_fields_as_other_writers_leave_them(tmp_path):
    # Configs not written by transformers 5: an explicit head_dim other than hidden_size / heads (Qwen3,
    # Mistral-Nemo style), an old LLaMA config with no rope_theta, rope_parameters, tie_word_embeddings nor
    # rms_norm_eps (transformers' defaults: theta 10000, untied, eps 1e-6), and transformers 5's "dtype" key in place of
    # "torch_dtype". Each is loaded by transformers from the same folder, and the logits must agree.
    ids, mask = left_padded_batch(97, [11, 7, 3, 11], seed=1)

    wide = transformers.LlamaConfig(**COMMON, vocab_size=97, head_dim=32)  # 4 heads x 32 != hidden 64
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(wide).float().eval()
    hf.save_pretrained(tmp_path / "wide")
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["head_dim"] == 32
    ours = hf_io.load_pretrained(tmp_path / "wide").eval()
    assert ours.layers[0].attention.wq.weight.shape == (4 * 32, 64)
    with torch.no_grad():
        assert_close_on_mask(ours(ids, mask), hf_logits(hf, ids, mask), mask)

    old = tmp_path / "old"
    hf_family_model("llama", vocab_size=97).save_pretrained(old)
    config = json.loads((old / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "rms_norm_eps"):
        config.pop(key, None)
    (old / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(old, attn_implementation="eager").float().eval()
    assert hf.config.tie_word_embeddings is False
    ours = hf_io.load_pretrained(old).eval()
    assert ours.output.weight is not ours.tok_embeddings.weight
    with torch.no_grad():
        assert_close_on_mask(ours(ids, mask), hf_logits(hf, ids, mask), mask)

    bf16 = tmp_path / "bf16"
    hf_family_model("llama", vocab_size=97).to(torch.bfloat16).save_pretrained(bf16)
    config = json.loads((bf16 / "config.json").read_text())
    assert config.get("dtype") == "bfloat16" and "torch_dtype" not in config  # transformers 5's spelling
    assert hf_io.load_pretrained(bf16).tok_embeddings.weight.dtype == torch.bfloat16


def test_qwen2_sliding_window_layers_are_refused(tmp_path):
    # Qwen2 with use_sliding_window: true windows the layers from max_window_layers on; the model has
    # no per-layer window, so such a config is refused by name rather than run with full attention.
    config = transformers.Qwen2Config(**COMMON, vocab_size=97, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_sliding_window"] is True
    with pytest.raises(ValueError, match="use_sliding_window: true"):
        hf_io.load_pretrained(tmp_path)
