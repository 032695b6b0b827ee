"""Checkpoint tokenizer folders as users have them, built locally (nothing is downloaded).

    write_llama3_folder(dir)        a Llama-3-style folder: byte-level BPE trained here with the `tokenizers`
                                    library, Llama-3's pre-tokenizer, special tokens, BOS post-processor, its
                                    tokenizer_config.json (instruct chat template), special_tokens_map.json and
                                    generation_config.json. Only tokenizer.json, as Llama-3/3.1/3.2 folders have.
    write_llama2_t5_folder(dir, m)  a Llama-2-style folder re-saved by transformers >= 5: the sentencepiece model
                                    `m` converted to tokenizer.json by transformers, saved with save_pretrained;
                                    no tokenizer.model left.
    write_llama2_legacy_folder(...) the same model as the tokenizer.json transformers 4 wrote for Llama-2
                                    (the "legacy" Prepend/Replace normalizer), with the tokenizer.model beside it.
    train_sentencepiece(path)       a small LLaMA-like sentencepiece BPE model (byte fallback, unk/bos/eos 0/1/2).
    varied_texts()                  text that stresses a tokenizer: unicode, emoji, CJK, spaces, numbers, code.

Used by tests/test_tokenizer.py; any test that wants a real-checkpoint-shaped tokenizer can import them.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

# The pre-tokenizer regex of Llama-3's tokenizer.json (tiktoken's cl100k pattern; transformers'
# TikTokenConverter uses the same one).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-3.2-Instruct's chat template (tokenizer_config.json): system header with the date (strftime_now),
# tools (tojson), raise_exception.
LLAMA32_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

SAFE_RLHF_EXAMPLE = "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:"


def varied_texts() -> list[str]:
    """Strings that exercise the corners of a tokenizer."""
    return [
        "Hello world", "hello", "Hello, World! How's it going? I'm fine; you'd say they'll've.",
        " leading space", "  two leading spaces", "trailing space ", "trailing spaces   ", " both ",
        "multiple   spaces   inside", "tabs\tand\t\ttabs", "new\nline", "two\n\nnewlines\n", "\n\nleading newlines",
        "crlf\r\nline", "mixed \t \n whitespace", " ", "   ", "\n", "",
        "digits 0123456789", "a long number 31415926535897932384626433", "3.14159 and -2e10 and 1,000,000",
        "Café ☕ costs 12.50€", "ÜNÏCÖDÉ naïve façade", "日本語のテキストです。", "中文文本，标点符号！", "한국어 텍스트",
        "Ελληνικά και русский текст", "emoji 😀🚀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷", "math ∑∫√∞ ≤ ≥ ≠",
        "def f(x):\n    if x > 0:\n        return x ** 2\n    return -x\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "<html><body class=\"x\">&amp;</body></html>",
        "snake_case camelCase kebab-case CONSTANT_CASE", "e-mail: someone@example.com, url: https://x.org/a?b=c#d",
        "quotes 'single' \"double\" `back` «guillemets»", "ALL CAPS SENTENCE", "MiXeD cAsE",
        SAFE_RLHF_EXAMPLE, "BEGINNING OF CONVERSATION: USER: Hi. How do I bake bread? ASSISTANT:",
        "Sure, here is how: mix flour and yeast; knead the dough well; let the dough rise.",
        "I'm sorry, but I can't help with that.",
    ]


def training_corpus() -> list[str]:
    """A few KB of varied text to train the small BPE models on."""
    words = ("the quick brown fox jumps over the lazy dog while bakers knead bread and engineers write code "
             "about tokenizers models datasets safety helpfulness reward cost policy value").split()
    lines = []
    for i in range(120):
        sentence = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(6 + i % 5))
        lines.append(f"{sentence.capitalize()}. Number {i * 37 % 1000} is {'even' if i % 2 == 0 else 'odd'}!")
    lines += varied_texts() * 3
    lines += [f"    return value_{i} + {i}  # comment {i}\n" for i in range(20)]
    return lines


# ---------------------------------------------------------------------------------------------
# sentencepiece

def train_sentencepiece(path: Path, vocab_size: int = 800, **options) -> Path:
    """A small sentencepiece BPE model with LLaMA's settings (byte fallback, split digits, identity normalisation,
    unk 0 / bos 1 / eos 2, no pad piece), written to `path`."""
    import sentencepiece as spm

    settings = dict(model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
                    byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0,
                    shuffle_input_sentence=False, minloglevel=2)
    settings.update(options)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_corpus()), model_writer=model, **settings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def _spm_vocab_and_merges(model_path: Path):
    """vocab and merges of a sentencepiece BPE model, as transformers' SentencePieceExtractor.extract gives them
    (vocab in piece order, merges from transformers' generate_merges), and its control pieces."""
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    controls = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
    return sp, vocab, generate_merges(vocab, None), controls  # None: vocab order (required in transformers 5.17)


LLAMA2_TOKENIZER_CONFIG = {  # the fields of Llama-2-7b-hf's tokenizer_config.json that matter here
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "legacy": False, "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer",
}


def write_llama2_t5_folder(out_dir: Path, sp_model: Path, chat_template: str | None = None,
                           from_pretrained: bool = False) -> Path:
    """A Llama-2-style folder as transformers >= 5 re-saves it: tokenizer.json + tokenizer_config.json (and a
    generation_config.json), no tokenizer.model.

    transformers 5 converts a tokenizer.model by extracting its vocab and merges (SentencePieceExtractor: the
    pieces in id order, merges from generate_merges) and building its LlamaTokenizer from them with the kwargs of
    tokenizer_config.json. The extractor needs protobuf, which this environment lacks, so by default we extract
    the same vocab and merges with sentencepiece's own API and call the same LlamaTokenizer constructor with
    Llama-2's config; from_pretrained=True lets LlamaTokenizer.from_pretrained do all of it (needs protobuf).
    Either way transformers' save_pretrained writes the folder."""
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    config = dict(LLAMA2_TOKENIZER_CONFIG, **({"chat_template": chat_template} if chat_template else {}))
    if from_pretrained:
        staging = out_dir.with_name(out_dir.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy(sp_model, staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        hf = LlamaTokenizer.from_pretrained(str(staging))
        shutil.rmtree(staging)
    else:
        _, vocab, merges, _ = _spm_vocab_and_merges(sp_model)
        hf = LlamaTokenizer(vocab=vocab, merges=merges, **{k: v for k, v in config.items() if k != "tokenizer_class"})
    shutil.rmtree(out_dir, ignore_errors=True)
    hf.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.model").unlink(missing_ok=True)
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out_dir


def write_llama2_legacy_folder(out_dir: Path, sp_model: Path) -> Path:
    """The tokenizer.json transformers 4 wrote for Llama-2 (LlamaConverter with legacy=True: a Prepend("▁") +
    Replace(" ", "▁") normalizer, no pre-tokenizer, "<s> $A" post-processor), with tokenizer.model beside it."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    _, vocab, merges, controls = _spm_vocab_and_merges(sp_model)
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ["<unk>"] + controls])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(out_dir / "tokenizer.json"))
    shutil.copy(sp_model, out_dir / "tokenizer.model")
    config = dict(LLAMA2_TOKENIZER_CONFIG, tokenizer_class="LlamaTokenizerFast", legacy=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Llama-3

def llama3_special_tokens(version: str = "3.1", n_reserved: int = 8) -> list[str]:
    """Llama-3's special tokens in id order (3.1 named <|finetune_right_pad_id|>, <|eom_id|>, <|python_tag|>
    where 3.0 had reserved tokens)."""
    if version == "3.0":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first = 5
    else:
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first = 3
    return named + [f"<|reserved_special_token_{first + i}|>" for i in range(n_reserved)]


def write_llama3_folder(out_dir: Path, version: str = "3.1", instruct: bool = True, vocab_size: int = 1000,
                        chat_template: str | None = LLAMA3_CHAT_TEMPLATE, pad_token: str | None = None) -> Path:
    """A Llama-3-style checkpoint tokenizer folder (no tokenizer.model): tokenizer.json, tokenizer_config.json
    (eos <|eot_id|> for instruct, <|end_of_text|> for base, as Meta's configs), special_tokens_map.json and
    generation_config.json (eos_token_id [<|end_of_text|>, <|eot_id|>])."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False, special_tokens=[])
    tk.train_from_iterator(training_corpus(), trainer)
    tk.model.ignore_merges = True  # as Llama-3's tokenizer.json (tiktoken semantics)
    specials = llama3_special_tokens(version)
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    ids = {t: tk.token_to_id(t) for t in specials}
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, ids[bos])]),
    ])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(out_dir / "tokenizer.json"))

    eos = "<|eot_id|>" if instruct else "<|end_of_text|>"
    config = {
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True} for t in specials},
        "bos_token": bos, "clean_up_tokenization_spaces": True, "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    if pad_token is not None:
        config["pad_token"] = pad_token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"bos_token": {"content": bos, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False},
                   "eos_token": {"content": eos, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    generation = {"bos_token_id": ids[bos], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir
