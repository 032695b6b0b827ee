"""Tokenizer wrapper and conversation templates (data/tokenizer.py).

The first part covers the sentencepiece backend on the synthetic task's tokenizer (unchanged behaviour). The second
builds checkpoint tokenizer folders as users have them (tests/make_tokenizers.py: Llama-3 with only tokenizer.json,
Llama-2 re-saved by transformers 5, Llama-2 as transformers 4 saved it) and compares ids, decoding, special tokens
and chat templates with transformers' own tokenizer on the same files.
"""

import io
import json
import warnings

import pytest
import sentencepiece as spm
import torch

from data.tokenizer import (PROMPT_TEMPLATE, TEMPLATES, Tokenizer, encode_dialogue, encode_prompt, format_prompt,
                            prompt_text, render_chat)
from make_tokenizers import (LLAMA3_CHAT_TEMPLATE, LLAMA32_CHAT_TEMPLATE, SAFE_RLHF_EXAMPLE, train_sentencepiece,
                            varied_texts, write_llama2_legacy_folder, write_llama2_t5_folder, write_llama3_folder)
import released


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


@pytest.mark.parametrize("name, vocab", [("llama-3.2-1b", "llama-bpe"), ("llama-3.2-1b-instruct", "llama-bpe"),
                                         ("qwen2.5-7b", "qwen2"), ("qwen2.5-7b-instruct", "qwen2"),
                                         ("llama-2-7b-chat", "llama-spm")])
def test_released_tokenizer_files_give_llamacpp_ids(name, vocab):
    """The releases' own tokenizer files (tests/released.py) through our Tokenizer, tokenizer.json and, where the
    release ships one, tokenizer.model: llama.cpp's expected ids on every one of its test strings for that
    vocabulary (an independent tokenizer's answer). No transformers involved, so it also runs with the oldest
    tokenizers and sentencepiece requirements.txt allows (CI's third environment). Every case, where
    transformers 5.25's own tokenizer gets 31 of 46 right on Llama-2's folder."""
    folder = released.need(released.released_tokenizer, name)
    cases = released.need(released.llamacpp_cases, vocab)
    assert len(cases) >= 40
    paths = [folder] + ([folder / "tokenizer.model"] if (folder / "tokenizer.model").is_file() else [])
    for path in paths:
        tok = Tokenizer(path)
        wrong = [(text, got, ids) for text, ids in cases if (got := tok.encode(text)) != ids]
        assert not wrong, (path.name, len(wrong), wrong[:3])


# =============================================================================================
# checkpoint tokenizers as users have them: Llama-3 (tokenizer.json only), Llama-2 re-saved by transformers 5,
# Llama-2 as transformers 4 saved it. Built locally by tests/make_tokenizers.py; compared with transformers' own
# tokenizer on the same files.

def hf_tokenizer(directory):
    """transformers' own tokenizer on the same folder: the reference."""
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(directory))


def hf_chat_ids(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def project_texts(synthetic_data, limit=None):
    """(prompt, response) pairs the project encodes: the synthetic SFT and preference data."""
    pairs = []
    for line in synthetic_data.sft_train.read_text().splitlines()[:limit]:
        record = json.loads(line)
        pairs.append((record["instruction"], record["output"]))
    for line in synthetic_data.preference_train.read_text().splitlines()[:limit]:
        record = json.loads(line)
        pairs += [(record["prompt"], record["response_0"]), (record["prompt"], record["response_1"])]
    return pairs


@pytest.fixture(scope="module")
def folders(tmp_path_factory, synthetic_data):
    pytest.importorskip("transformers")  # it converts the Llama-2 tokenizer.json files
    root = tmp_path_factory.mktemp("checkpoint_tokenizers")
    small_sp = train_sentencepiece(root / "sp" / "tokenizer.model")
    return {
        "llama3": write_llama3_folder(root / "llama3"),
        "llama3_base": write_llama3_folder(root / "llama3_base", instruct=False),
        "llama3.0": write_llama3_folder(root / "llama3.0", version="3.0"),
        "llama32": write_llama3_folder(root / "llama32", chat_template=LLAMA32_CHAT_TEMPLATE),
        "small_sp": small_sp,
        "llama2_t5": write_llama2_t5_folder(root / "llama2_t5", small_sp),
        "llama2_legacy": write_llama2_legacy_folder(root / "llama2_legacy", small_sp),
        # the synthetic task's own tokenizer.model, converted by transformers 5
        "synthetic_t5": write_llama2_t5_folder(root / "synthetic_t5", synthetic_data.tokenizer),
    }


# ---------------------------------------------------------------------------------------------
# loading, special tokens, files

def test_llama3_folder(folders):
    directory = folders["llama3"]
    tok, hf = Tokenizer(directory), hf_tokenizer(directory)
    assert not (directory / "tokenizer.model").exists()
    assert tok.backend == "tokenizers" and tok.path == directory / "tokenizer.json"
    assert [p.name for p in tok.files] == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                          "generation_config.json"]
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                                    "<|finetune_right_pad_id|>")}
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"])
    from transformers import GenerationConfig
    generation = GenerationConfig.from_pretrained(str(directory))
    assert tok.eos_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])
    assert set(tok.eos_ids) == {hf.eos_token_id, *generation.eos_token_id}
    assert tok.pad_id == ids["<|finetune_right_pad_id|>"] and tok.pad_id not in tok.eos_ids
    assert tok.add_bos and tok.vocab_size == len(hf)
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def test_llama3_base_and_3_0_special_tokens(folders):
    base, hf = Tokenizer(folders["llama3_base"]), hf_tokenizer(folders["llama3_base"])
    assert base.eos_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|end_of_text|>")
    assert base.eos_ids == (base.eos_id, hf.convert_tokens_to_ids("<|eot_id|>"))  # generation_config adds eot
    old, hf_old = Tokenizer(folders["llama3.0"]), hf_tokenizer(folders["llama3.0"])
    assert "<|finetune_right_pad_id|>" not in hf_old.get_vocab()
    assert old.pad_id == hf_old.convert_tokens_to_ids("<|reserved_special_token_0|>")


def test_pad_token_from_the_config_even_an_eos_as_transformers(tmp_path):
    chosen = write_llama3_folder(tmp_path / "a", pad_token="<|reserved_special_token_5|>")
    tok, hf = Tokenizer(chosen), hf_tokenizer(chosen)
    assert tok.pad_id == hf.pad_token_id == hf.convert_tokens_to_ids("<|reserved_special_token_5|>")
    for eos_like in ("<|eot_id|>", "<|end_of_text|>"):  # a common fine-tuning setting, and Qwen's release: pad = an EOS
        folder = write_llama3_folder(tmp_path / eos_like[2:-2], pad_token=eos_like)
        tok, hf = Tokenizer(folder), hf_tokenizer(folder)
        assert tok.pad_id == hf.pad_token_id == hf.convert_tokens_to_ids(eos_like) and tok.pad_id in tok.eos_ids


def test_pad_falls_back_to_eos(tmp_path):
    folder = write_llama3_folder(tmp_path / "nopad")
    spec = json.loads((folder / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:  # no <|finetune_right_pad_id|>, no reserved tokens (and no unk)
        if "reserved" in token["content"] or "pad" in token["content"]:
            token["content"] = token["content"].replace("|", "!")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer(folder)
    assert tok.unk_id is None and tok.pad_id == tok.eos_id == hf_tokenizer(folder).convert_tokens_to_ids("<|eot_id|>")


def test_special_tokens_map_and_dict_tokens_as_transformers_reads_them(tmp_path):
    folder = write_llama3_folder(tmp_path / "l3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # with added_tokens_decoder in tokenizer_config.json, special_tokens_map.json is not read
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert Tokenizer(folder).eos_id == hf_tokenizer(folder).eos_token_id == hf_tokenizer(folder).convert_tokens_to_ids("<|eot_id|>")
    # without it, special_tokens_map.json overrides tokenizer_config.json
    del config["added_tokens_decoder"]
    config["eos_token"] = {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}  # as transformers 4 wrote tokens
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = hf_tokenizer(folder)
    assert Tokenizer(folder).eos_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|end_of_text|>")
    (folder / "special_tokens_map.json").unlink()
    hf = hf_tokenizer(folder)
    assert Tokenizer(folder).eos_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|eot_id|>")  # the dict form


def test_generation_config_eos_forms(tmp_path):
    folder = write_llama3_folder(tmp_path / "l3")
    tok = Tokenizer(folder)
    eot, end = tok.eos_ids
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    assert Tokenizer(folder).eos_ids == (eot, end)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot]}))
    assert Tokenizer(folder).eos_ids == (eot,)
    (folder / "generation_config.json").unlink()
    assert Tokenizer(folder).eos_ids == (eot,)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, 10 ** 6]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id \[.*\] is not an id"):
        Tokenizer(folder)


def test_bos_follows_the_post_processor_as_in_transformers(tmp_path):
    folder = write_llama3_folder(tmp_path / "nobos")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = spec["post_processor"]["processors"][0]  # ByteLevel only: no BOS template
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True  # transformers >= 5 ignores it when there is a tokenizer.json
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    assert not tok.add_bos and tok.bos_id == hf.bos_token_id
    assert encode_prompt(tok, "Hi") == hf.encode(format_prompt("Hi")) == tok.encode(format_prompt("Hi"))


def test_sentencepiece_reads_add_bos_token_and_special_tokens(tmp_path, synthetic_data):
    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(synthetic_data.tokenizer.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<s>",
                                                              "eos_token": {"content": "</s>"}, "pad_token": "</s>"}))
    tok = Tokenizer(folder)
    assert tok.backend == "sentencepiece" and not tok.add_bos
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # pad_token = eos, as configured
    assert encode_prompt(tok, "Hi") == tok.encode(format_prompt("Hi"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<nope>' is not in the vocabulary"):
        Tokenizer(folder)


def test_directory_preference_and_files(folders, tmp_path):
    legacy = folders["llama2_legacy"]
    assert Tokenizer(legacy).backend == "tokenizers"  # both files: tokenizer.json preferred
    forced = Tokenizer(legacy / "tokenizer.model")
    assert forced.backend == "sentencepiece"
    assert [p.name for p in forced.files] == ["tokenizer.model", "tokenizer_config.json"]
    assert [p.name for p in Tokenizer(folders["llama2_t5"]).files] == ["tokenizer.json", "tokenizer_config.json",
                                                                       "generation_config.json"]
    template_file = write_llama3_folder(tmp_path / "jinja", chat_template=None)
    (template_file / "chat_template.jinja").write_text(LLAMA3_CHAT_TEMPLATE)  # transformers >= 4.43 saves it apart
    tok = Tokenizer(template_file)
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE and tok.files[-1].name == "chat_template.jinja"
    assert Tokenizer(write_llama3_folder(tmp_path / "none", chat_template=None)).chat_template is None


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer(tmp_path)
    original = tmp_path / "llama3" / "original"
    original.mkdir(parents=True)
    (original / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # a tiktoken file, as Llama-3 ships it
    with pytest.raises(ValueError, match="tiktoken file: load the tokenizer.json"):
        Tokenizer(original / "tokenizer.model")


# ---------------------------------------------------------------------------------------------
# ids against transformers

@pytest.mark.parametrize("name", ["llama3", "llama3.0", "llama2_t5", "synthetic_t5"])
def test_ids_and_decoding_equal_transformers(folders, name):
    tok, hf = Tokenizer(folders[name]), hf_tokenizer(folders[name])
    texts = varied_texts() + ["knead the dough well", format_prompt("How do I bake bread?")]
    for text in texts:
        plain = tok.encode(text)
        assert plain == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, bos=tok.add_bos) == hf.encode(text), text  # transformers' own special tokens
        assert tok.decode(plain) == hf.decode(plain), text
        if name.startswith("llama3") or not text.startswith(" "):
            assert tok.decode(plain) == text, text  # Metaspace's decoder strips one leading space
    assert encode_prompt(tok, "How do I bake bread?") == hf.encode(SAFE_RLHF_EXAMPLE)


def test_special_token_text_is_parsed_like_transformers(folders):
    tok, hf = Tokenizer(folders["llama3"]), hf_tokenizer(folders["llama3"])
    text = "before<|eot_id|>after"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.eos_id in tok.encode(text)
    sp = Tokenizer(folders["small_sp"])
    assert sp.eos_id not in sp.encode("before</s>after")  # sentencepiece: plain text


def test_transformers5_llama2_folder_matches_the_sentencepiece_model(folders, synthetic_data):
    """What the project encodes (prompt and response separately) gives the same ids from the converted
    tokenizer.json as from the original tokenizer.model; only text starting with a space differs."""
    converted, original = Tokenizer(folders["synthetic_t5"]), Tokenizer(synthetic_data.tokenizer)
    assert (converted.bos_id, converted.eos_ids, converted.pad_id, converted.vocab_size, converted.add_bos) == \
           (original.bos_id, original.eos_ids, original.pad_id, original.vocab_size, original.add_bos)
    pairs = project_texts(synthetic_data)
    assert len(pairs) > 10000
    for prompt, response in pairs:
        assert encode_dialogue(converted, prompt, response) == encode_dialogue(original, prompt, response)
    small, small_sp = Tokenizer(folders["llama2_t5"]), Tokenizer(folders["small_sp"])
    for text in varied_texts():
        if not text.startswith(" "):
            assert small.encode(text) == small_sp.encode(text), text
            continue
        # sentencepiece prepends its word-start marker to the leading space ("▁▁leading"); Metaspace does not
        assert small.encode(text) != small_sp.encode(text), text
        if text[1:2].strip():  # one leading space: the converted tokenizer reads it as the word-start marker
            assert small.encode(text) == small_sp.encode(text[1:]), text


def test_transformers4_llama2_folder_follows_the_file(folders):
    """A legacy Llama-2 tokenizer.json (Prepend normalizer) gives sentencepiece's ids, leading spaces included.
    transformers >= 5 rebuilds LlamaTokenizer without that normalizer, so it agrees only on text that does not
    start with a space."""
    legacy, sp, hf = Tokenizer(folders["llama2_legacy"]), Tokenizer(folders["small_sp"]), hf_tokenizer(folders["llama2_legacy"])
    for text in varied_texts():
        assert legacy.encode(text) == sp.encode(text), text
        assert legacy.decode(legacy.encode(text)) == sp.decode(sp.encode(text)), text
        if not text.startswith(" "):
            assert legacy.encode(text, bos=True) == hf.encode(text), text


# ---------------------------------------------------------------------------------------------
# templates

def test_default_template_is_plain_sentencepiece(tok, synthetic_data):
    """The default template's ids are exactly [bos] + sentencepiece ids, as before this module had backends."""
    sp = spm.SentencePieceProcessor(model_file=str(synthetic_data.tokenizer))
    for prompt, response in project_texts(synthetic_data, limit=1000):
        expected_prompt = [sp.bos_id()] + sp.EncodeAsIds(format_prompt(prompt))
        assert encode_prompt(tok, prompt) == encode_prompt(tok, prompt, template="safe_rlhf") == expected_prompt
        assert encode_dialogue(tok, prompt, response) == (expected_prompt + sp.EncodeAsIds(response) + [sp.eos_id()],
                                                          len(expected_prompt))


def test_safe_rlhf_template_on_llama3(folders):
    tok = Tokenizer(folders["llama3"])
    ids, n_prompt = encode_dialogue(tok, "How do I bake bread?", "Mix flour and water.")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[n_prompt:]) == "Mix flour and water."
    assert tok.decode(ids) == SAFE_RLHF_EXAMPLE + "Mix flour and water."  # byte-level BPE: no space inserted


CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "  Café ☕ 日本語 😀\n\tcode:\n    x = 1  "},
     {"role": "assistant", "content": "Sure, here is how: mix flour and yeast."},
     {"role": "user", "content": SAFE_RLHF_EXAMPLE}],
]


@pytest.mark.parametrize("name", ["llama3", "llama32"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_equals_apply_chat_template(folders, name, messages):
    pytest.importorskip("jinja2")  # optional: renders chat templates
    tok, hf = Tokenizer(folders[name]), hf_tokenizer(folders[name])
    for add_generation_prompt in (True, False):
        for variables in ({}, {"date_string": "1 Jan 2025"}):
            # Llama-3.2 prints a date: ours 26 Jul 2024 unless given one (whatever the day), transformers' today's
            theirs = {"date_string": "26 Jul 2024"} | variables
            text = render_chat(tok, messages, add_generation_prompt=add_generation_prompt, **variables)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **theirs)
            assert tok.encode(text) == hf_chat_ids(hf, messages, add_generation_prompt=add_generation_prompt, **theirs)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")


def test_chat_template_tools_tojson_and_raise_exception(folders):
    jinja2 = pytest.importorskip("jinja2")  # optional: renders chat templates
    tok, hf = Tokenizer(folders["llama32"]), hf_tokenizer(folders["llama32"])
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather at a place (°C)",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "user", "content": "Weather in Zürich?"}]
    text = render_chat(tok, messages, tools=[tool], date_string="1 Jan 2025")
    assert text == hf.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False,
                                          date_string="1 Jan 2025")
    assert '"description": "Weather at a place (°C)"' in text  # tojson: not ASCII-escaped, indent=4
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    two_calls = messages + [{"role": "assistant", "tool_calls": [call, call]}]
    with pytest.raises(ValueError, match="chat template of .*llama32 fails: This model only supports single tool-calls"):
        render_chat(tok, two_calls)
    with pytest.raises(jinja2.TemplateError, match="single tool-calls"):
        hf.apply_chat_template(two_calls, tokenize=False)


@pytest.mark.parametrize("name", ["llama3", "llama32"])
def test_chat_template_prompt_and_dialogue(folders, name):
    """The prompt part is the template with the generation prompt; prompt + response + eos is the whole
    conversation as transformers renders and tokenizes it: what the policy sees = what SFT trains on."""
    pytest.importorskip("jinja2")  # optional: renders chat templates
    tok, hf = Tokenizer(folders[name]), hf_tokenizer(folders[name])
    prompt, response = "How do I bake bread?", "Sure, here is how: mix flour and yeast."
    user = [{"role": "user", "content": prompt}]
    day = {"date_string": "26 Jul 2024"}  # the day our templates print (Llama-3.2's date line), every day
    prompt_ids = encode_prompt(tok, prompt, template="chat")
    assert prompt_ids == hf_chat_ids(hf, user, add_generation_prompt=True, **day)
    assert prompt_text(tok, prompt, "chat") == hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False,
                                                                      **day)
    assert ("Today Date: 26 Jul 2024" in prompt_text(tok, prompt, "chat")) == (name == "llama32")
    ids, n_prompt = encode_dialogue(tok, prompt, response, template="chat")
    assert n_prompt == len(prompt_ids) and ids[:n_prompt] == prompt_ids
    assert ids == hf_chat_ids(hf, user + [{"role": "assistant", "content": response}], **day)
    assert ids[-1] == tok.eos_id == hf.convert_tokens_to_ids("<|eot_id|>")
    assert tok.decode(ids[n_prompt:]) == response
    # the prompt holds EOS tokens (each turn ends with <|eot_id|>): decode it whole with stop_at_eos=False
    assert tok.decode(prompt_ids, stop_at_eos=False) == prompt_text(tok, prompt, "chat").removeprefix("<|begin_of_text|>")
    assert prompt in tok.decode(prompt_ids, stop_at_eos=False)
    # template variables pass through (Llama-3.2 prints the date it is given)
    pinned, _ = encode_dialogue(tok, prompt, response, template="chat", date_string="1 Jan 2025")
    assert pinned == hf_chat_ids(hf, user + [{"role": "assistant", "content": response}], date_string="1 Jan 2025")


def test_chat_template_errors(folders, tok, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        encode_prompt(tok, "Hi", template="alpaca")
    assert TEMPLATES == ("safe_rlhf", "chat")
    with pytest.raises(ValueError, match="the chat template needs a tokenizer.json"):
        encode_prompt(tok, "Hi", template="chat")
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(Tokenizer(folders["llama2_t5"]), "Hi", template="chat")
    from data import tokenizer as module
    module._compile_chat_template.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "jinja2", None)
    with pytest.raises(ImportError, match=r"--template chat\) needs jinja2"):
        encode_prompt(Tokenizer(folders["llama3"]), "Hi", template="chat")
    module._compile_chat_template.cache_clear()


def test_decode_stops_at_every_eos(folders):
    tok = Tokenizer(folders["llama3"])
    ids = tok.encode("knead the dough well", bos=True)
    junk = tok.encode("junk after eos")
    for eos in tok.eos_ids:
        row = ids + [eos] + junk + [tok.pad_id] * 3
        assert tok.decode(row) == "knead the dough well"
        assert tok.decode(torch.tensor([tok.pad_id] * 2 + row)) == "knead the dough well"
    assert tok.decode(ids + [tok.eos_id] + junk, stop_at_eos=False) == "knead the dough well<|eot_id|>junk after eos"
    assert "vocabulary" in tok.describe() and "<|eot_id|>" in tok.describe()


def test_decode_when_pad_is_an_eos(tmp_path):
    # Qwen's release pads with <|endoftext|>, an EOS: left padding is skipped, the answer ends at the first EOS,
    # and a pad that cannot be told from an EOS is kept as text when decoding past EOS ids.
    tok = Tokenizer(write_llama3_folder(tmp_path / "l3", pad_token="<|end_of_text|>"))
    ids, pad = tok.encode("knead the dough well"), tok.pad_id
    assert pad in tok.eos_ids and pad != tok.eos_id
    assert tok.decode([pad, pad] + ids + [tok.eos_id, pad, pad]) == "knead the dough well"
    assert tok.decode([pad, pad] + ids + [pad, pad]) == "knead the dough well"  # the EOS is the pad itself
    assert tok.decode([pad] + ids + [pad], stop_at_eos=False) == "knead the dough well<|end_of_text|>"


def test_chat_template_generation_blocks_and_loop_controls(tmp_path):
    pytest.importorskip("jinja2")  # optional: renders chat templates
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
                "{% else %}{{ bos_token + m.role + ': ' + m.content | tojson }}{% endif %}{% if loop.index == 2 %}"
                "{% break %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>{% endif %}")
    folder = write_llama3_folder(tmp_path / "l3", chat_template=template)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    messages = [{"role": "user", "content": "a \"quoted\" <b>é</b>"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "never shown"}]
    assert render_chat(tok, messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_chat(tok, messages) == '<|begin_of_text|>user: "a \\"quoted\\" <b>é</b>"ok<|start_header_id|>'


def test_chat_template_dates_do_not_depend_on_the_day(tmp_path):
    """A template that prints today's date through strftime_now (as Llama-3.1's does without a date_string, and
    others directly) prints 26 Jul 2024 on any day: a prompt's ids are the same whenever a stage runs."""
    pytest.importorskip("jinja2")  # optional: renders chat templates
    template = ('{{ bos_token + strftime_now("%Y-%m-%d") + " " + strftime_now("%d %b %Y") }}'
                '{% for m in messages %}{{ m.content }}{% endfor %}')
    tok = Tokenizer(write_llama3_folder(tmp_path / "l3", chat_template=template))
    assert render_chat(tok, [{"role": "user", "content": "Hi"}]) == "<|begin_of_text|>2024-07-26 26 Jul 2024Hi"


def test_chat_template_on_a_base_release_ends_answers_with_the_end_of_turn(folders):
    """A base release ends a text with <|end_of_text|> (its eos_token), but its chat template ends an assistant
    turn with <|eot_id|>: for_template("chat") makes that end of turn the EOS (eos_id, and first of eos_ids), so a
    dialogue is exactly transformers' apply_chat_template of the conversation; safe_rlhf keeps the tokenizer."""
    pytest.importorskip("jinja2")  # optional: renders chat templates
    base, hf = Tokenizer(folders["llama3_base"]), hf_tokenizer(folders["llama3_base"])
    eot, end_of_text = hf.convert_tokens_to_ids("<|eot_id|>"), hf.convert_tokens_to_ids("<|end_of_text|>")
    assert base.eos_id == end_of_text and base.for_template("safe_rlhf") is base
    chat = base.for_template("chat")
    assert chat.eos_id == eot and chat.eos_ids[0] == eot and set(chat.eos_ids) == {eot, end_of_text}
    assert base.eos_id == end_of_text  # a copy: the tokenizer itself is unchanged
    prompt, response = "How do I bake bread?", "Mix flour and yeast."
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids, _ = encode_dialogue(chat, prompt, response, template="chat", date_string="1 Jan 2025")
    assert ids == hf_chat_ids(hf, conversation, date_string="1 Jan 2025") and ids[-1] == eot


def test_truncation_and_padding_in_tokenizer_json_are_not_applied(tmp_path):
    # A tokenizer.json saved with truncation and padding switched on (a training script's leftovers): like
    # transformers' encode, ours neither cuts a text nor pads it; cutting is the data loaders' job, counted.
    plain = write_llama3_folder(tmp_path / "plain")
    folder = write_llama3_folder(tmp_path / "cut")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 5,
                       "pad_type_id": 0, "pad_token": "<|finetune_right_pad_id|>"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    hf = hf_tokenizer(folder)
    text = "knead the dough well, let it rise for an hour, then bake it"
    ids = Tokenizer(folder).encode(text)
    assert ids == Tokenizer(plain).encode(text) == hf.encode(text, add_special_tokens=False)
    assert 4 < len(ids) < 64
    assert encode_prompt(Tokenizer(folder), text) == hf.encode(format_prompt(text))


def test_chat_turn_end_found_without_the_generation_config_listing_it(tmp_path):
    """A base release whose generation_config.json lists only its end of text (Qwen2.5 base: <|endoftext|>,
    while its template ends a turn with <|im_end|>): the end of turn is still the special token the template
    writes after an answer, so a dialogue is transformers' apply_chat_template of the conversation."""
    pytest.importorskip("jinja2")  # optional: renders chat templates
    folder = write_llama3_folder(tmp_path / "base", instruct=False)
    hf = hf_tokenizer(folder)
    eot, end_of_text = hf.convert_tokens_to_ids("<|eot_id|>"), hf.convert_tokens_to_ids("<|end_of_text|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": end_of_text}))
    base = Tokenizer(folder)
    assert base.eos_ids == (end_of_text,)
    chat = base.for_template("chat")
    assert chat.eos_id == eot and chat.eos_ids == (eot, end_of_text)
    prompt, response = "How do I bake bread?", "Mix flour and yeast."
    ids, _ = encode_dialogue(chat, prompt, response, template="chat")
    assert ids == hf_chat_ids(hf, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def test_named_chat_templates_use_the_default_one_as_transformers(tmp_path):
    # tokenizer_config.json's chat_template as a list of named templates (tool-use releases): "default",
    # wherever it is in the list.
    pytest.importorskip("jinja2")  # optional: renders chat templates
    folder = write_llama3_folder(tmp_path / "named", chat_template=None)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
                               {"name": "default", "template": LLAMA3_CHAT_TEMPLATE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    assert render_chat(tok, messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_a_pad_token_outside_the_vocabulary_is_passed_over(tmp_path):
    # tokenizer_config.json names a pad_token the vocabulary lacks ("<pad>", which transformers would add as a
    # new id past the model's embeddings): the folder loads, and the next candidate pads.
    folder = write_llama3_folder(tmp_path / "pad", pad_token="<pad>")
    tok = Tokenizer(folder)
    assert tok.pad_id == hf_tokenizer(folder).convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert tok.pad_id < tok.vocab_size


def test_generation_eos_one_past_the_vocabulary_is_refused(tmp_path):
    # ids run from 0 to len(vocabulary) - 1: an eos_token_id equal to the vocabulary size names no token.
    folder = write_llama3_folder(tmp_path / "l3")
    size = len(hf_tokenizer(folder))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [size - 1]}))
    assert Tokenizer(folder).eos_ids[-1] == size - 1
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [size]}))
    with pytest.raises(ValueError, match=rf"eos_token_id \[{size}\] is not an id of .*\(vocabulary {size}\)"):
        Tokenizer(folder)
