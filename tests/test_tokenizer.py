"""Tokenizer wrapper and conversation template (data/tokenizer.py)."""

import io
import json

import pytest
import sentencepiece as spm
import torch

from data.tokenizer import (PROMPT_TEMPLATE, Tokenizer, encode_dialogue, encode_prompt, format_prompt,
                            resolve_pad_id)


@pytest.fixture(scope="session")
def tok(synthetic_data):
    return Tokenizer(synthetic_data.tokenizer)


def _train_tiny_model(path, **special_ids):
    """A small sentencepiece model with chosen special ids, written to path."""
    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   num_threads=1, minloglevel=2, **special_ids)
    path.write_bytes(model.getvalue())
    return path


def test_special_ids_llama_layout(tok, synthetic_data):
    # the synthetic tokenizer uses LLaMA's layout: unk 0, bos 1, eos 2, no pad piece -> pad falls back to unk
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.sp.pad_id() == -1
    assert tok.pad_id != tok.eos_id
    assert tok.vocab_size == synthetic_data.stats["vocab_size"]
    assert 512 <= tok.vocab_size <= 1024


def test_pad_piece_used_when_defined(tmp_path):
    tok = Tokenizer(_train_tiny_model(tmp_path / "t.model", unk_id=0, bos_id=1, eos_id=2, pad_id=3))
    assert tok.pad_id == 3
    tok = Tokenizer(_train_tiny_model(tmp_path / "u.model", unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    assert tok.pad_id == 0


def test_resolve_pad_id():
    assert resolve_pad_id(pad_id=5, unk_id=0, eos_id=2) == 5
    assert resolve_pad_id(pad_id=-1, unk_id=0, eos_id=2) == 0
    with pytest.raises(ValueError, match="pad id 2 equals eos id 2"):
        resolve_pad_id(pad_id=2, unk_id=0, eos_id=2)
    with pytest.raises(ValueError, match="pad id 2 equals eos id 2"):
        resolve_pad_id(pad_id=-1, unk_id=2, eos_id=2)


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)  # a directory without tokenizer.model
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model is not a valid sentencepiece model"):
        Tokenizer(bad)


def test_directory_holding_tokenizer_model(synthetic_data):
    assert Tokenizer(synthetic_data.dir).vocab_size == Tokenizer(synthetic_data.tokenizer).vocab_size


def test_round_trip_on_the_generated_corpus(tok, synthetic_data):
    texts = []
    for path in (synthetic_data.sft_train, synthetic_data.preference_train, synthetic_data.ppo_prompts,
                 synthetic_data.eval_prompts):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            texts += [v for k, v in record.items() if k in ("instruction", "output", "prompt", "response_0", "response_1")]
    texts += [format_prompt(t) for t in texts[:500]]
    assert len(texts) > 10000
    assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_round_trip_of_text_outside_the_corpus(tok):
    # byte fallback: any text survives, even characters the corpus never had
    for text in ["Café ☕ costs 12.50€", "tabs\tand  double  spaces", "ÜNÏCÖDÉ 日本語"]:
        assert tok.decode(tok.encode(text)) == text


def test_encode_flags_and_decode_cleanup(tok):
    ids = tok.encode("knead the dough well", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.encode("knead the dough well") == ids[1:-1]
    # a generate() row: prompt + response + eos + pads (and junk a sampler may leave after the EOS)
    row = ids + [tok.pad_id] * 3 + tok.encode("junk after eos")
    assert tok.decode(row) == "knead the dough well"
    assert tok.decode(torch.tensor(row)) == "knead the dough well"
    assert tok.decode([tok.pad_id, tok.pad_id] + ids) == "knead the dough well"  # left padding too


def test_template_text():
    assert PROMPT_TEMPLATE == "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    assert format_prompt("How do I bake bread?") == "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:"


def test_template_token_ids(tok):
    prompt, response = "Hi. How do I bake bread?", "Sure, here is how: mix flour and yeast."
    prompt_ids = encode_prompt(tok, prompt)
    assert prompt_ids == [tok.bos_id] + tok.encode(format_prompt(prompt))
    ids, n_prompt = encode_dialogue(tok, prompt, response)
    assert ids == prompt_ids + tok.encode(response) + [tok.eos_id]
    assert n_prompt == len(prompt_ids)
    assert tok.decode(ids[n_prompt:]) == response
    # decoded as a whole, the response's word-start marker shows as one space after "ASSISTANT:"
    assert tok.decode(ids) == format_prompt(prompt) + " " + response
