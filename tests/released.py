"""Tokenizer folders of real model releases, rebuilt from files the Python package registry ships (test fixtures).

Our tests must run against tokenizer files as the releases ship them, not against vocabularies made up for the
test. Nothing can be fetched from the Hugging Face Hub here, but the real vocabularies are on PyPI:

  llama-cpp-python==0.3.36 (sdist)   vendor/llama.cpp/models/ggml-vocab-{llama-bpe,qwen2,llama-spm}.gguf: the
                                     vocabularies of Llama-3, Qwen2 and LLaMA/Llama-2 as GGUF files (tokens, merges,
                                     scores, token types), with llama.cpp's tokenizer test strings (.gguf.inp) and
                                     the ids llama.cpp's tokenizer gives them (.gguf.out, no BOS: test-tokenizer-0
                                     tokenizes with add_special=false); models/templates/*.jinja: chat templates
                                     copied from the releases' tokenizer_config.json by llama.cpp's
                                     scripts/get_chat_template.py (Qwen2.5-7B-Instruct, Llama-3.2-3B-Instruct).
  mistral-common==1.13.1 (wheel)     mistral_common/data/mistral_instruct_tokenizer_240323.model.v3: the
                                     sentencepiece model of Mistral's v3 tokenizer (Mistral-7B-Instruct-v0.3).

From these we write each release's tokenizer.json (the exact pipeline of the release's file: pre-tokenizer,
normalizer, post-processor, decoder, BPE options and added tokens, with the real vocabulary and merges), its
tokenizer.model where the release has one, and tokenizer_config.json, special_tokens_map.json,
generation_config.json and config.json with the released contents (config.json shrunk to a tiny model).

API
    RELEASES                           name -> Release (how each folder is laid out; see the comments there)
    released_tokenizer(name) -> Path   the release's tokenizer/generation/config files, no weights. This is the
                                       cache folder itself: read it, do not write into it
    released_checkpoint(name, dest, seed=0, dtype=None) -> Path
                                       the same files copied into `dest` plus random tiny weights saved by
                                       transformers (norms and biases perturbed) in the release's dtype (bfloat16;
                                       Llama-2: float16), i.e. what a user has after downloading it
    llamacpp_cases(vocab) -> [(text, ids)]
                                       llama.cpp's test strings and expected ids, vocab in LLAMACPP_VOCABS
    Unavailable                        raised when the sources cannot be had (offline, a package missing):
                                       tests do `pytest.skip(str(error))`

Cache: $SAFE_RLHF_FIXTURES if set, else ~/.cache/safe-rlhf-minimal/released/<FIXTURE_VERSION>. Built once
(about 76 MB + 7 MB downloaded, pinned by sha256; the sdist is streamed, only the needed members are kept),
into a temporary folder renamed into place, under an fcntl lock so that concurrent test processes build it
once. SAFE_RLHF_FIXTURES_OFFLINE=1 never downloads (Unavailable unless already built).
SAFE_RLHF_PYPI_SIMPLE overrides the simple index (default https://pypi.org/simple/).

Command line:
    python tests/released.py            build everything (if not cached), print the folders and the time taken
    python tests/released.py --check    also check every folder with transformers and sentencepiece: llama.cpp's
                                        ids, checkpoints load, chat templates render
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

FIXTURE_VERSION = "1"  # bump when what is built changes: a new version builds into a new cache folder


class Unavailable(Exception):
    """The released files cannot be had here (no network, a package missing): skip the test."""


def need(build, *args):
    """In a test: build(*args) (released_tokenizer, llamacpp_cases, ...), or a skip with the reason when the
    registry cannot be reached; CI sets SAFE_RLHF_FIXTURES_REQUIRED=1, so that a network failure there fails
    instead of passing as skips."""
    import pytest

    try:
        return build(*args)
    except Unavailable as reason:
        if os.environ.get("SAFE_RLHF_FIXTURES_REQUIRED", "0") not in ("", "0"):
            raise
        pytest.skip(f"released files unavailable: {reason}")


# ---------------------------------------------------------------------------------------------------------------
# Sources: pinned registry files

@dataclasses.dataclass(frozen=True)
class _Source:
    project: str
    filename: str
    sha256: str
    size: int
    members: dict  # member path in the archive -> file name under sources/


_SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
LLAMACPP_VOCABS = ("llama-bpe", "qwen2", "llama-spm")
_SOURCES = (
    _Source("llama-cpp-python", "llama_cpp_python-0.3.36.tar.gz",
            "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e", 76589250,
            {**{f"{_SDIST_ROOT}models/ggml-vocab-{v}.gguf{ext}": f"ggml-vocab-{v}.gguf{ext}"
                for v in LLAMACPP_VOCABS for ext in ("", ".inp", ".out")},
             f"{_SDIST_ROOT}models/templates/Qwen-Qwen2.5-7B-Instruct.jinja": "Qwen-Qwen2.5-7B-Instruct.jinja",
             f"{_SDIST_ROOT}models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja":
                 "meta-llama-Llama-3.2-3B-Instruct.jinja"}),
    _Source("mistral-common", "mistral_common-1.13.1-py3-none-any.whl",
            "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af", 6589302,
            {"mistral_common/data/mistral_instruct_tokenizer_240323.model.v3": "mistral-v3.model"}),
)
_GGUF_FILES = [f"ggml-vocab-{v}.gguf" for v in LLAMACPP_VOCABS]  # only needed while building; not kept


def _simple_index_url(project: str) -> str:
    base = os.environ.get("SAFE_RLHF_PYPI_SIMPLE", "https://pypi.org/simple/")
    return base.rstrip("/") + f"/{project}/"


def _open_url(url: str, accept: str | None = None):
    headers = {"User-Agent": "safe-rlhf-minimal-tests"}
    if accept:
        headers["Accept"] = accept
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except (urllib.error.URLError, OSError) as error:  # no network, DNS, refused, timeout
        raise Unavailable(f"cannot download {url}: {error}") from None


def _file_url(source: _Source) -> str:
    """The file's URL from the registry's simple index (PEP 691 JSON)."""
    with _open_url(_simple_index_url(source.project), "application/vnd.pypi.simple.v1+json") as response:
        try:
            index = json.load(response)
        except (ValueError, OSError) as error:
            raise Unavailable(f"{source.project}: unreadable simple index: {error}") from None
    for entry in index.get("files", []):
        if entry.get("filename") == source.filename:
            listed = entry.get("hashes", {}).get("sha256")
            if listed and listed != source.sha256:
                raise RuntimeError(f"{source.filename}: the index lists sha256 {listed}, pinned {source.sha256}")
            return entry["url"]
    raise Unavailable(f"{source.filename} is not in {_simple_index_url(source.project)}")


class _HashingReader(io.RawIOBase):
    """A readable stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.stream.read(len(buffer))
        self.sha256.update(data)
        self.size += len(data)
        buffer[:len(data)] = data
        return len(data)

    def drain(self):
        while self.read(1 << 20):
            pass


def _fetch(source: _Source, out_dir: Path) -> int:
    """Download `source`, check its sha256 and write the members it is pinned for into out_dir. Returns the bytes
    downloaded. A .tar.gz is streamed (hashed while it is decompressed; nothing of it is written but the members);
    a wheel is read into memory (zip needs random access)."""
    url = _file_url(source)
    wanted = dict(source.members)
    try:
        with _open_url(url) as response:
            reader = _HashingReader(response)
            if source.filename.endswith(".tar.gz"):
                with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|gz") as archive:
                    for member in archive:
                        name = wanted.pop(member.name, None)
                        if name is not None and member.isfile():
                            (out_dir / name).write_bytes(archive.extractfile(member).read())
                    reader.drain()
            else:
                data = reader.read()
                reader.drain()
    except (urllib.error.URLError, OSError, EOFError, tarfile.TarError) as error:
        raise Unavailable(f"cannot download {url}: {error}") from None
    if reader.sha256.hexdigest() != source.sha256 or reader.size != source.size:
        raise RuntimeError(f"{source.filename}: downloaded {reader.size} bytes with sha256 "
                           f"{reader.sha256.hexdigest()}, pinned {source.size} bytes {source.sha256}")
    if not source.filename.endswith(".tar.gz"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member, name in list(wanted.items()):
                (out_dir / name).write_bytes(archive.read(member))
                del wanted[member]
    if wanted:
        raise RuntimeError(f"{source.filename} lacks {sorted(wanted)}")
    return reader.size


# ---------------------------------------------------------------------------------------------------------------
# GGUF (the key/value part only: vocabulary files hold no tensors). Minimal reader, ~0.2 s for a 128k vocabulary
# (the gguf package's reader takes ~8 s on these files).

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a GGUF file (v2/v3, little-endian): scalars, strings and arrays as Python values."""
    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} not supported")
    pos = 24

    def string(p):
        n, = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n].decode("utf-8"), p + 8 + n

    def value(kind, p):
        if kind == 8:
            return string(p)
        if kind == 9:
            item, n = struct.unpack_from("<IQ", data, p)
            p += 12
            if item == 8:
                out = []
                for _ in range(n):
                    s, p = string(p)
                    out.append(s)
                return out, p
            fmt = "<" + _GGUF_SCALARS[item]
            size = struct.calcsize(fmt)
            return [v for (v,) in struct.iter_unpack(fmt, data[p:p + n * size])], p + n * size
        fmt = "<" + _GGUF_SCALARS[kind]
        return struct.unpack_from(fmt, data, p)[0], p + struct.calcsize(fmt)

    metadata = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        kind, = struct.unpack_from("<I", data, pos)
        metadata[key], pos = value(kind, pos + 4)
    return metadata


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json pieces, in the layout the `tokenizers` library saves

def _added_token(token_id: int, content: str, special: bool = True, normalized: bool = False) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def _decoder_entry(content: str, special: bool = True) -> dict:
    """An added_tokens_decoder entry of tokenizer_config.json."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _token_map_entry(content: str) -> dict:
    """A special_tokens_map.json entry."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _bos_template(bos: str, bos_id: int) -> dict:
    """TemplateProcessing "<bos> $A" / "<bos> $A <bos> $B:1", as transformers' converters write it."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _tokenizer_json(added_tokens, normalizer, pre_tokenizer, post_processor, decoder, model) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": decoder, "model": model}


def _write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + ("\n" if indent else ""), encoding="utf-8")


def _byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# The pre-tokenizer regexes of the releases' tokenizer.json files.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _spm_merges(pieces: list[str], scores: list[float]) -> list[str]:
    """The BPE merges transformers' SentencePieceExtractor wrote for a sentencepiece BPE model when the Llama-2 /
    Mistral tokenizer.json files were made (transformers 4.3x/4.4x, `extract(vocab_scores)`): for every piece, each
    split into two pieces of the vocabulary (ordered by their ids), all ranked by the piece's score, best first
    (stable, so ties keep id order). Ranking by score, not id, matters: LLaMA's "▁▁" (id 259) has score -1e9."""
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        local = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend((score, left, right) for _, _, left, right in sorted(local))
    merges.sort(key=lambda m: -m[0])
    return [f"{left} {right}" for _, left, right in merges]


def _spm_bpe_model(pieces, scores) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {piece: i for i, piece in enumerate(pieces)}, "merges": _spm_merges(pieces, scores)}


_SPM_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


def _sentencepiece_pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # sentencepiece, or the protobuf runtime its _pb2 module needs
        raise Unavailable(f"rebuilding a tokenizer.model needs sentencepiece and protobuf: {error}") from None
    return sentencepiece_model_pb2


# ---------------------------------------------------------------------------------------------------------------
# Templates not in the sdist, verbatim from the releases' tokenizer_config.json

# meta-llama/Llama-2-7b-chat-hf (the template added to tokenizer_config.json in late 2023; the "\\n" are Jinja
# escapes inside Jinja string literals, as in the file).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.3 (the "v3" template with tool calls that Mistral put in its v3-tokenizer
# releases in 2024; llama.cpp's tests/test-chat-template.cpp carries the same text for Mistral-Large-2407).
MISTRAL_V3_CHAT_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

_QWEN_INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_HUGE = 1000000000000000019884624838656  # transformers' VERY_LARGE_INTEGER, as model_max_length in old configs


def _tiny(config: dict, head_dim: bool = False) -> dict:
    """The release's config.json with the model shrunk (vocab, tying, rope and window settings kept)."""
    tiny = dict(config, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    if head_dim:
        tiny["head_dim"] = 16
    return dict(sorted(tiny.items()))


# ---------------------------------------------------------------------------------------------------------------
# Builders: each writes one release folder from the extracted sources

def _llama3_specials() -> list[str]:
    """Llama-3.1/3.2's 256 special tokens, ids 128000.. (3.1 renamed four of 3.0's reserved tokens and shifted the
    numbering of the rest: 3.0's <|reserved_special_token_6|> at 128011 is 3.1's <|reserved_special_token_3|>)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]


def _build_llama32(src: Path, out: Path, instruct: bool):
    kv = read_gguf_metadata(src / "ggml-vocab-llama-bpe.gguf")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    n_base = 128000
    assert len(tokens) == 128256 and all(t == 1 for t in types[:n_base]) and all(t == 3 for t in types[n_base:])
    assert tokens[128000] == "<|begin_of_text|>" and tokens[128009] == "<|eot_id|>"
    specials = _llama3_specials()
    added = [_added_token(n_base + i, t) for i, t in enumerate(specials)]
    bos, eos = "<|begin_of_text|>", "<|eot_id|>" if instruct else "<|end_of_text|>"
    tokenizer = _tokenizer_json(
        added, None,
        {"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False, True, False)]},
        {"type": "Sequence", "processors": [_byte_level(True, False, True), _bos_template(bos, 128000)]},
        _byte_level(True, True, True),
        {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
         "vocab": {t: i for i, t in enumerate(tokens[:n_base])}, "merges": kv["tokenizer.ggml.merges"]})
    _write_json(out / "tokenizer.json", tokenizer)
    config = {"added_tokens_decoder": {str(n_base + i): _decoder_entry(t) for i, t in enumerate(specials)},
              "bos_token": bos, "clean_up_tokenization_spaces": True, "eos_token": eos,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if instruct:  # the base release has no chat template
        config["chat_template"] = (src / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text(encoding="utf-8")
    _write_json(out / "tokenizer_config.json", dict(sorted(config.items())))
    _write_json(out / "special_tokens_map.json", {"bos_token": _token_map_entry(bos),
                                                  "eos_token": _token_map_entry(eos)})
    eos_ids = [128001, 128008, 128009] if instruct else 128001
    generation = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": eos_ids, "temperature": 0.6,
                  "top_p": 0.9, "transformers_version": "4.45.0.dev0"}
    if not instruct:
        generation = {"_from_model_config": True, **generation}
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "config.json", _tiny({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": eos_ids, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}, head_dim=True))


# Qwen2.5's added tokens after the 151643 BPE tokens: (content, special) as in tokenizer.json/tokenizer_config.json.
QWEN25_ADDED = [(t, True) for t in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>")] + [(t, False) for t in (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")]


def _build_qwen25(src: Path, out: Path, instruct: bool):
    kv = read_gguf_metadata(src / "ggml-vocab-qwen2.gguf")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    n_base = 151643
    assert all(t == 1 for t in types[:n_base])
    # The GGUF (Qwen1.5/2) has the first three added tokens; Qwen2.5 added 19 more where the GGUF has [PAD] fillers.
    assert tokens[n_base:n_base + 3] == [t for t, _ in QWEN25_ADDED[:3]] and tokens[n_base + 3].startswith("[PAD")
    added = [_added_token(n_base + i, t, special) for i, (t, special) in enumerate(QWEN25_ADDED)]
    tokenizer = _tokenizer_json(
        added, {"type": "NFC"},
        {"type": "Sequence", "pretokenizers": [_split(QWEN2_PATTERN), _byte_level(False, False, False)]},
        _byte_level(False, False, False), _byte_level(False, False, False),
        {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
         "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
         "vocab": {t: i for i, t in enumerate(tokens[:n_base])}, "merges": kv["tokenizer.ggml.merges"]})
    _write_json(out / "tokenizer.json", tokenizer)
    template = (src / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    assert template.count(_QWEN_INSTRUCT_SYSTEM) == 2
    if not instruct:  # the base release ships the same template with the generic system prompt
        template = template.replace(_QWEN_INSTRUCT_SYSTEM, "You are a helpful assistant.")
    eos = "<|im_end|>" if instruct else "<|endoftext|>"
    additional = [t for t, special in QWEN25_ADDED[1:] if special]
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(n_base + i): _decoder_entry(t, s) for i, (t, s) in enumerate(QWEN25_ADDED)},
        "additional_special_tokens": additional, "bos_token": None, "chat_template": template,
        "clean_up_tokenization_spaces": False, "eos_token": eos, "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None})
    _write_json(out / "special_tokens_map.json", {"additional_special_tokens": additional,
                                                  "eos_token": _token_map_entry(eos),
                                                  "pad_token": _token_map_entry("<|endoftext|>")})
    if instruct:
        generation = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                      "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                      "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
    else:
        generation = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048,
                      "transformers_version": "4.37.0"}
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "config.json", _tiny({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645 if instruct else 151643, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944,
        "max_position_embeddings": 32768 if instruct else 131072, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1" if instruct else "4.40.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 152064}))


def _llama_trainer_spec(spec, vocab_size: int):
    """LLaMA's sentencepiece trainer settings (Meta's tokenizer.model, as sentencepiece prints it)."""
    spec.input.append("/large_experiments/theorem/datasets/MERGED/all.test1.merged")
    spec.model_prefix = "spm_model_32k_200M_charcov099995_allowWSO__v2"
    spec.model_type = spec.BPE
    spec.vocab_size = vocab_size
    spec.self_test_sample_size = 0
    spec.input_format = "text"
    spec.character_coverage = 0.99995
    spec.input_sentence_size = 200000000
    spec.seed_sentencepiece_size = 1000000
    spec.shrinking_factor = 0.75
    spec.num_threads = 80
    spec.num_sub_iterations = 2
    spec.max_sentence_length = 4192
    spec.shuffle_input_sentence = True
    spec.max_sentencepiece_length = 16
    spec.split_by_unicode_script = True
    spec.split_by_whitespace = True
    spec.split_by_number = True
    spec.treat_whitespace_as_suffix = False
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.vocabulary_output_piece_score = True
    spec.hard_vocab_limit = True
    spec.use_all_vocab = False
    spec.byte_fallback = True
    spec.required_chars = ""
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.unk_surface = " \u2047 "
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    spec.train_extremely_large_corpus = False


def _build_llama2_chat(src: Path, out: Path):
    kv = read_gguf_metadata(src / "ggml-vocab-llama-spm.gguf")
    pieces, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    assert len(pieces) == 32000 and pieces[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    pb2 = _sentencepiece_pb2()
    model = pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):  # GGUF token types are sentencepiece's piece types
        entry = model.pieces.add(piece=piece, score=score)
        if kind != entry.NORMAL:  # as sentencepiece writes it: the default type is left out
            entry.type = kind
    _llama_trainer_spec(model.trainer_spec, len(pieces))
    spec = model.normalizer_spec
    spec.name, spec.precompiled_charsmap = "identity", b""
    spec.add_dummy_prefix, spec.remove_extra_whitespaces, spec.normalization_rule_tsv = True, False, ""
    (out / "tokenizer.model").write_bytes(model.SerializeToString())
    # tokenizer.json as transformers 4.3x wrote it for the release: LlamaConverter with legacy=True.
    tokenizer = _tokenizer_json(
        [_added_token(i, pieces[i]) for i in range(3)],
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                             {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        None, _bos_template("<s>", 1), _SPM_DECODER, _spm_bpe_model(pieces, scores))
    _write_json(out / "tokenizer.json", tokenizer)

    def token(t):  # transformers 4.31's format
        return {"__type": "AddedToken", **_token_map_entry(t)}

    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"),
        "chat_template": LLAMA2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": token("</s>"),
        "legacy": False, "model_max_length": _HUGE, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": token("<unk>")})
    _write_json(out / "special_tokens_map.json", {"bos_token": _token_map_entry("<s>"),
                                                  "eos_token": _token_map_entry("</s>"),
                                                  "unk_token": _token_map_entry("<unk>")})
    _write_json(out / "generation_config.json", {
        "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
        "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.32.0.dev0"})
    _write_json(out / "config.json", _tiny({
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": 32000}))


def _build_mistral_v03(src: Path, out: Path):
    pb2 = _sentencepiece_pb2()
    model = pb2.ModelProto()
    model.ParseFromString((src / "mistral-v3.model").read_bytes())
    assert len(model.pieces) == 32768 and model.pieces[3].piece == "[INST]" and model.pieces[771].piece == "<0x00>"
    # mistral-common's v3 model names ids 10..770 [IMG], [PREFIX], [MIDDLE], [SUFFIX], [control_12].. and (as
    # user-defined pieces) [REFERENCE_DOC_19]..[REFERENCE_DOC_0]; the Mistral-7B(-Instruct)-v0.3 release calls
    # them all control pieces [control_8]..[control_768] (id = n + 2). Everything else is the release's.
    for i in range(10, 771):
        model.pieces[i].piece, model.pieces[i].type = f"[control_{i - 2}]", model.pieces[i].CONTROL
    del model.trainer_spec.control_symbols[:]
    del model.trainer_spec.user_defined_symbols[:]
    model.trainer_spec.control_symbols.extend(p.piece for p in model.pieces[3:771])
    (out / "tokenizer.model").write_bytes(model.SerializeToString())
    pieces, scores = [p.piece for p in model.pieces], [p.score for p in model.pieces]
    # tokenizer.json as transformers 4.42 converted it for the release (legacy=False: Metaspace, no normalizer;
    # the converter scores <unk>, <s>, </s> 0 like the other control pieces).
    tokenizer = _tokenizer_json(
        [_added_token(i, pieces[i]) for i in range(771)], None,
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
        _bos_template("<s>", 1), _SPM_DECODER, _spm_bpe_model(pieces, [0.0] * 3 + scores[3:]))
    _write_json(out / "tokenizer.json", tokenizer)
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): _decoder_entry(pieces[i]) for i in range(771)},
        "additional_special_tokens": [], "bos_token": "<s>", "chat_template": MISTRAL_V3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False, "model_max_length": _HUGE,
        "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False})
    _write_json(out / "special_tokens_map.json", {"bos_token": _token_map_entry("<s>"),
                                                  "eos_token": _token_map_entry("</s>"),
                                                  "unk_token": _token_map_entry("<unk>")})
    _write_json(out / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                                 "transformers_version": "4.42.0.dev0"})
    _write_json(out / "config.json", _tiny({
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 32768}))


# ---------------------------------------------------------------------------------------------------------------
# The releases

@dataclasses.dataclass(frozen=True)
class Release:
    repo: str                 # the Hugging Face repository reproduced
    build: Callable           # build(sources_dir, out_dir)
    vocab: str | None         # the llama.cpp vocabulary (llamacpp_cases) its tokenizer must reproduce, if any
    instruct: bool
    dtype: str                # the released weights' dtype (config.json torch_dtype); checkpoints are saved in it


RELEASES: dict[str, Release] = {
    # meta-llama/Llama-3.2-1B-Instruct: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    # generation_config.json, config.json (no tokenizer.model). Vocabulary and merges: llama.cpp's llama-bpe GGUF
    # (Llama-3.0; 3.2 has the same BPE), special tokens renamed as 3.1/3.2 name them (<|finetune_right_pad_id|>,
    # <|eom_id|>, <|python_tag|>, reserved 2..247 renumbered). Chat template: llama.cpp's copy of
    # Llama-3.2-3B-Instruct's (the 1B's is the same). tokenizer.json (9,085,658 bytes) and tokenizer_config.json
    # (54,528) have the release's sizes as download logs show them (9.09M, 54.5k). Known differences: the merges
    # are "a b" strings (the release may hold [a, b] pairs: the same merges); config.json is the tiny model.
    "llama-3.2-1b-instruct": Release("meta-llama/Llama-3.2-1B-Instruct",
                                     lambda s, o: _build_llama32(s, o, True), "llama-bpe", True, "bfloat16"),
    # meta-llama/Llama-3.2-1B (base): the same tokenizer.json; eos_token <|end_of_text|>, generation_config
    # eos_token_id 128001 (do_sample, temperature 0.6, top_p 0.9, as Meta's base configs) and NO chat_template in
    # tokenizer_config.json (as released: https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/
    # tokenizer_config.json has none, noted in sgl-project/sglang#3385). Same differences as the Instruct folder.
    "llama-3.2-1b": Release("meta-llama/Llama-3.2-1B", lambda s, o: _build_llama32(s, o, False), "llama-bpe",
                            False, "bfloat16"),
    # Qwen/Qwen2.5-7B-Instruct: tokenizer.json (NFC, Qwen2's split regex, byte-level BPE from llama.cpp's qwen2
    # GGUF, the 22 added tokens: <tool_call>..<|file_sep|> not special, as released), tokenizer_config.json
    # (pad <|endoftext|> = the base model's EOS and the instruct model's second EOS; bos null; chat template with
    # tools, from llama.cpp's copy of this release's), special_tokens_map.json, generation_config.json, config.json.
    # The release also ships vocab.json and merges.txt (the slow tokenizer's files); they are not written here.
    # vocab_size is 152064, as in the 7B release (the embedding is 399 rows larger than the 151665 tokens;
    # Qwen2.5-0.5B..3B have 151936). Not compared byte for byte with the release's files.
    "qwen2.5-7b-instruct": Release("Qwen/Qwen2.5-7B-Instruct", lambda s, o: _build_qwen25(s, o, True), "qwen2",
                                   True, "bfloat16"),
    # Qwen/Qwen2.5-7B (base): the same tokenizer; eos_token <|endoftext|>; the chat template of the base
    # releases (Instruct's, default system prompt "You are a helpful assistant."); generation_config without
    # sampling; max_position_embeddings 131072.
    "qwen2.5-7b": Release("Qwen/Qwen2.5-7B", lambda s, o: _build_qwen25(s, o, False), "qwen2", False, "bfloat16"),
    # mistralai/Mistral-7B-Instruct-v0.3: tokenizer.model (mistral-common's v3 sentencepiece model with ids 10-770
    # renamed [control_8]..[control_768] as in the release; its trainer_spec lists them), tokenizer.json (as
    # transformers 4.42 converted it: Metaspace prepend_scheme "first", 771 special added tokens), tokenizer_config
    # .json (add_bos_token, legacy false, no pad, the v3 template with tool calls), special_tokens_map.json,
    # generation_config.json, config.json. The release also ships tokenizer.model.v3, consolidated.safetensors and
    # params.json (mistral-inference's files): not written. Not checked against llama.cpp (no GGUF of it in the
    # sdist); compare it with sentencepiece on the tokenizer.model: with Metaspace "first" the tokenizer.json (and
    # so transformers) tokenizes a text that begins with a space differently from sentencepiece (" Hello" ->
    # "▁Hello", sentencepiece "▁▁Hello"), as the release does. The template is the tool-calling one of the later
    # revisions; the first revision (May 2024) had a short [INST] template (its tokenizer_config.json was 137 kB;
    # this one is 140.9 kB). special_tokens_map.json and generation_config.json have the release's sizes.
    "mistral-7b-instruct-v0.3": Release("mistralai/Mistral-7B-Instruct-v0.3", _build_mistral_v03, None, True,
                                        "bfloat16"),
    # meta-llama/Llama-2-7b-chat-hf: tokenizer.model rebuilt from llama.cpp's llama-spm GGUF (pieces, scores,
    # types; LLaMA's trainer/normalizer spec: BPE, byte_fallback, split_digits, identity normalizer,
    # add_dummy_prefix, no extra-whitespace removal, unk/bos/eos 0/1/2), tokenizer.json as transformers 4.31
    # wrote it (legacy Prepend/Replace normalizer), tokenizer_config.json (AddedToken dicts, legacy false, pad
    # null, the <<SYS>> chat template), special_tokens_map.json, generation_config.json, config.json with
    # torch_dtype float16 (the release's weights are float16, and released_checkpoint saves them so).
    # Known differences: the tokenizer.model is 499,711 bytes, Meta's 499,723 (trainer_spec strings as far as
    # known; pieces, scores and types are the GGUF's: sentencepiece reproduces llama.cpp's ids). transformers >= 5
    # builds its LlamaTokenizer from the vocab/merges with legacy=false (Metaspace) and ignores the legacy
    # normalizer in tokenizer.json, so its ids differ from sentencepiece's for texts that begin with a space.
    "llama-2-7b-chat": Release("meta-llama/Llama-2-7b-chat-hf", _build_llama2_chat, "llama-spm", True, "float16"),
}


# ---------------------------------------------------------------------------------------------------------------
# Cache

def cache_root() -> Path:
    configured = os.environ.get("SAFE_RLHF_FIXTURES")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "safe-rlhf-minimal" / "released" / FIXTURE_VERSION


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_all(root: Path) -> dict:
    """Download the sources and write every release folder into `root` (a fresh directory)."""
    _sentencepiece_pb2()  # fail before downloading if a package is missing
    stats = {"downloaded_bytes": 0}
    sources = root / "sources"
    sources.mkdir(parents=True)
    for source in _SOURCES:
        stats["downloaded_bytes"] += _fetch(source, sources)
    for name, release in RELEASES.items():
        out = root / name
        out.mkdir()
        release.build(sources, out)
    for name in _GGUF_FILES:  # built into the folders; keep only the test strings (.inp/.out) and templates
        (sources / name).unlink()
    _write_json(root / "BUILT.json", {"fixture_version": FIXTURE_VERSION, "releases": sorted(RELEASES),
                                      "sources": [s.filename for s in _SOURCES], **stats})
    return stats


def _ensure_built() -> Path:
    root = cache_root()
    if (root / "BUILT.json").is_file():
        return root
    if os.environ.get("SAFE_RLHF_FIXTURES_OFFLINE") == "1":
        raise Unavailable(f"released tokenizer fixtures not built in {root} and SAFE_RLHF_FIXTURES_OFFLINE=1")
    with _locked(root.with_name(root.name + ".lock")):
        if (root / "BUILT.json").is_file():  # another process built it while we waited
            return root
        staging = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
        try:
            _build_all(staging)
            if root.exists():  # an unfinished cache (no BUILT.json): replace it, if it is nothing else
                foreign = {p.name for p in root.iterdir()} - {*RELEASES, "sources", "BUILT.json"}
                if foreign:
                    raise RuntimeError(f"{root} exists and is not a fixture cache (it holds {sorted(foreign)[:3]});"
                                       " point SAFE_RLHF_FIXTURES at a new folder")
                shutil.rmtree(root)
            os.rename(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def released_tokenizer(name: str) -> Path:
    """The folder of the release's tokenizer/generation/config files (built on first use; see the module doc)."""
    if name not in RELEASES:
        raise KeyError(f"unknown release {name!r}: choose one of {', '.join(RELEASES)}")
    return _ensure_built() / name


def llamacpp_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test strings for a vocabulary and the ids llama.cpp gives them, parsed as
    tests/test-tokenizer-0.cpp does: inputs separated by "\\n__ggml_vocab_test__\\n", one line of space-separated
    ids per input, no BOS (it tokenizes with add_special=false, parse_special=false). Duplicate inputs appear once
    (the C++ test keeps them in a map)."""
    if vocab not in LLAMACPP_VOCABS:
        raise KeyError(f"unknown llama.cpp vocabulary {vocab!r}: choose one of {', '.join(LLAMACPP_VOCABS)}")
    sources = _ensure_built() / "sources"
    raw = (sources / f"ggml-vocab-{vocab}.gguf.inp").read_bytes().decode("utf-8")
    lines = (sources / f"ggml-vocab-{vocab}.gguf.out").read_bytes().decode("utf-8").split("\n")
    separator = "\n__ggml_vocab_test__\n"
    texts, pos = [], 0
    while pos < len(raw):
        end = raw.find(separator, pos)
        if end < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:end])
        pos = end + len(separator)
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"llama.cpp {vocab}: {len(texts)} inputs but {len(lines)} outputs")
    cases, seen = [], set()
    for text, line in zip(texts, lines):
        if text not in seen:
            seen.add(text)
            cases.append((text, [int(x) for x in line.split()]))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

def _perturb_(model, generator):
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def released_checkpoint(name: str, dest: Path, seed: int = 0, dtype: str | None = None) -> Path:
    """`dest` with the release's files (released_tokenizer(name)) and random tiny weights saved by transformers:
    AutoModelForCausalLM.from_config(config) (seeded), norms and biases perturbed by 0.1*randn so that a dropped
    one shows, cast to `dtype` (default: the release's, config.json's torch_dtype: bfloat16, float16 for Llama-2)
    and saved with save_pretrained (model.safetensors). That is what a user has after downloading the release,
    weights excepted: config.json and generation_config.json stay as released, not re-saved by transformers
    (which would rewrite them in its own version's format). Deterministic for a seed; ~0.1-0.5 s."""
    folder = released_tokenizer(name)
    try:
        import torch
        import transformers
    except ImportError as error:
        raise Unavailable(f"random checkpoints need torch and transformers: {error}") from None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        shutil.copyfile(path, dest / path.name)
    config = transformers.AutoConfig.from_pretrained(dest)
    with _seeded(seed):
        model = transformers.AutoModelForCausalLM.from_config(config)
    _perturb_(model, torch.Generator().manual_seed(seed))
    model = model.to(getattr(torch, dtype or RELEASES[name].dtype))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(dir=dest) as saved:
            model.save_pretrained(saved)
            for path in Path(saved).iterdir():  # only the weights: the release's own config files stay
                if path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json"):
                    os.replace(path, dest / path.name)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return dest


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------------------------
# Command line: build (and with --check, verify) everything

def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _score(encode, cases) -> str:
    """"k/n": on how many of the (text, ids) cases encode(text) gives the ids, and the first few that differ."""
    bad = [text for text, ids in cases if encode(text) != ids]
    return f"{len(cases) - len(bad)}/{len(cases)}" + (f" (differ: {', '.join(repr(t)[:24] for t in bad[:4])}...)"
                                                      if bad else "")


def _check() -> dict:
    """Each folder read by transformers, by the tokenizers library, by sentencepiece and by data.tokenizer: ids on
    llama.cpp's test strings against llama.cpp's ids (Mistral: against sentencepiece on its tokenizer.model),
    chat template rendered, checkpoint loaded by transformers."""
    import sentencepiece as spm
    import tokenizers
    import transformers

    results = {}
    for name, release in RELEASES.items():
        folder = released_tokenizer(name)
        row = results[name] = {}
        started = time.perf_counter()
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        row["transformers"] = f"{type(hf).__name__}, loaded in {time.perf_counter() - started:.2f} s"
        sp = None
        if (folder / "tokenizer.model").exists():
            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        if release.vocab:
            cases, reference = llamacpp_cases(release.vocab), "llama.cpp"
        else:
            cases, reference = [(t, sp.encode(t)) for t, _ in llamacpp_cases("llama-spm")], "sentencepiece"
        raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        row[f"ids vs {reference}: transformers"] = _score(
            lambda t, hf=hf: hf.encode(t, add_special_tokens=False), cases)
        row[f"ids vs {reference}: tokenizers(tokenizer.json)"] = _score(
            lambda t, raw=raw: raw.encode(t, add_special_tokens=False).ids, cases)
        if sp is not None and release.vocab:
            row[f"ids vs {reference}: sentencepiece(tokenizer.model)"] = _score(sp.encode, cases)
        try:
            from data.tokenizer import Tokenizer
            for path in [folder] + ([folder / "tokenizer.model"] if sp is not None else []):
                ours = Tokenizer(path)
                key = f"ids vs {reference}: data.tokenizer({path.name})"
                row[key] = _score(ours.encode, cases) + f"; bos={ours.bos_id} eos={ours.eos_id} pad={ours.pad_id}"
        except Exception as error:  # noqa: BLE001 (report whatever it is)
            row["data.tokenizer"] = f"{type(error).__name__}: {error}"[:300]
        if release.instruct:
            row["chat"] = hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                 tokenize=False)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            checkpoint = released_checkpoint(name, Path(tmp) / name)
            made = time.perf_counter() - started
            model, info = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
            problems = {k: v for k, v in info.items() if v}
            row["checkpoint"] = (f"made in {made:.2f} s; {type(model).__name__} {model.dtype} "
                                 f"{sum(p.numel() for p in model.parameters())} parameters"
                                 + (f"; loading info {problems}" if problems else "; no missing/unexpected keys"))
    return results


def main(argv=None):
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify every folder with transformers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    root = _ensure_built()
    built = json.loads((root / "BUILT.json").read_text())
    print(f"released fixtures in {root} ({time.perf_counter() - started:.1f} s, "
          f"{built['downloaded_bytes'] / 1e6:.1f} MB downloaded when built, {_dir_size(root) / 1e6:.1f} MB on disk)")
    for name in RELEASES:
        started = time.perf_counter()
        folder = released_tokenizer(name)
        print(f"  {name:26s} {folder}  ({(time.perf_counter() - started) * 1000:.1f} ms)")
    if args.check:
        for name, row in _check().items():
            print(f"{name}:")
            for key, value in row.items():
                print(f"    {key}: {value!r}" if key == "chat" else f"    {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
