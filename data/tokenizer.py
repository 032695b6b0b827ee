"""Tokenizer (sentencepiece or Hugging Face tokenizer.json) and the conversation templates.

One `Tokenizer` class, two backends, chosen by the file:

    tokenizer.model   sentencepiece: LLaMA / Llama-2 as Meta ships them and the synthetic task's tokenizer
                      (data/synthetic.py uses LLaMA's trainer settings). Same ids and behaviour as before.
    tokenizer.json    the `tokenizers` library: Llama-3/3.1/3.2 (byte-level BPE, no tokenizer.model at all) and any
                      folder re-saved by transformers >= 5 (which writes tokenizer.json and no tokenizer.model).
    a directory       its tokenizer.json if there is one, else its tokenizer.model. tokenizer.json is preferred
                      because it is what transformers loads, it carries the added/special tokens a chat template
                      writes, and for the Llama-2 folders that hold both files (saved by transformers 4) it gives
                      sentencepiece's ids. Pass the tokenizer.model file itself to force sentencepiece.

Special tokens come from the files beside the tokenizer, read the way transformers reads them:
tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`, `unk_token` as strings or {"content": ...} dicts;
special_tokens_map.json overrides them only when tokenizer_config.json has no `added_tokens_decoder`, as in
transformers), generation_config.json (`eos_token_id`, an int or a list) and the chat template
(chat_template.jinja, else tokenizer_config.json's `chat_template`). Without these files (the synthetic task's
directory holds only tokenizer.model) the sentencepiece model's own pieces are used, as before.

- EOS. `eos_id` is the configured eos_token (Llama-3 instruct: <|eot_id|>; base: <|end_of_text|>), the token our
  templates put after a response. `eos_ids` is every id that ends generation: eos_id first, then
  generation_config's eos_token_id (Llama-3.1 instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>).
  `decode` stops at the first of any of them.
- BOS. Prepended exactly when transformers' encode(text) would prepend it: the tokenizer.json post-processor
  decides (transformers >= 5 ignores add_bos_token when there is a tokenizer.json); for a sentencepiece model,
  tokenizer_config.json's add_bos_token, default True (LLaMA). `add_bos` says which. An EOS the post-processor
  would append (add_eos_token) is not added: our templates put EOS only after a response.
- Pad, chosen as transformers would, and allowed to be an EOS id (Qwen2/2.5 pad with <|endoftext|>, their base
  model's EOS and one of the instruct model's): the config's pad_token, whatever it is; else the sentencepiece
  model's pad piece; else <|finetune_right_pad_id|> (Llama-3.1/3.2); else the lowest <|reserved_special_token_N|>
  (Llama-3.0); else the unk token (LLaMA, Llama-2 and Mistral ship no pad: unk, id 0, which a well-formed text
  never produces); else the EOS. Nothing downstream reads padding from token ids: loss masks, end scores, the
  "last real token", generation masks and truncation all come from attention masks and EOS positions.
- Special-token text. The tokenizers backend, like transformers, turns the text of a special token ("<|eot_id|>",
  "</s>") inside a string into that token (the chat template relies on it); sentencepiece encodes it as plain text.

Templates (`encode_prompt(tok, prompt, template)`, `encode_dialogue(tok, prompt, response, template)`,
`encode_answers(tok, prompt, answers, template)`):

    "safe_rlhf" (default)  BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}<eos>, BOS in front when
                           the tokenizer adds one (SAFE_RLHF.md). Same ids as before for the sentencepiece models.
    "chat"                 the checkpoint's own chat template, rendered with jinja2 as transformers'
                           apply_chat_template(messages=[{"role": "user", "content": prompt}],
                           add_generation_prompt=True) renders it, and encoded as transformers tokenizes it
                           (special tokens parsed, nothing added: the template writes its own BOS). Then
                           {response}<eos>, eos = the template's end of turn (`Tokenizer.for_template("chat")`:
                           the token it writes after an assistant message; Llama-3 <|eot_id|>, Qwen <|im_end|>,
                           even for their base releases, whose eos_token ends a text, not a turn). Needs jinja2
                           and a tokenizer.json. Such a prompt holds EOS tokens itself
                           (each turn ends with <|eot_id|>): decode it with decode(ids, stop_at_eos=False).
                           Llama-3.1/3.2 templates print a date: CHAT_TEMPLATE_DAY, the same every day (render_chat
                           takes date_string=... for another), and
                           templates trim message contents while the response is encoded as given.

Why the prompt part and the response are encoded SEPARATELY and the ids concatenated (`encode_dialogue`): at
rollout time the policy is given exactly `encode_prompt(prompt)` and samples the response token by token after it,
so the response can never merge with the prompt's last characters. Encoding the whole string at once would let the
tokenizer merge across the boundary (":" with the first word, say), so SFT and the reward/cost models would train
on a tokenisation the policy never produces. With the split, the ids SFT and the score models train on are
`encode_prompt(prompt) + encode(response) + [eos_id]`, and a rollout is `encode_prompt(prompt)` + sampled ids +
an EOS: in token space the two are the same sequence, whichever template. For the chat template the prompt part
is the rendered template with the generation prompt (Llama-3: "...<|start_header_id|>assistant<|end_header_id|>
\\n\\n"), which is exactly the prefix transformers renders before an assistant message; for Llama-3 the whole
dialogue's ids then equal apply_chat_template of the conversation with the answer as the assistant message.
How the boundary shows in text depends on the tokenizer: sentencepiece (and Llama-2 tokenizer.json) puts a
word-start marker on the response's first token, decoded as one space after "ASSISTANT:"; byte-level BPE
(Llama-3) adds nothing, so the decoded text reads "ASSISTANT:Sure, ...".

Leading spaces. sentencepiece prepends its word-start marker to every text, so " Sure" becomes "▁▁Sure";
a tokenizer.json written by transformers >= 5 (Metaspace pre-tokenizer) does not double it (" Sure" -> "▁Sure"),
and its decoder strips one leading space. For text that does not start with a space (every prompt the templates
produce, and ordinary responses) the two give the same ids; a response that starts with a space does not. A
Llama-2 tokenizer.json from transformers 4 (Prepend normalizer) gives sentencepiece's ids, and we follow the file
(transformers >= 5 rebuilds LlamaTokenizer pipelines and does not).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from datetime import date
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
TEMPLATES = ("safe_rlhf", "chat")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in order of preference within a directory
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")


def find_tokenizer_file(path: str | Path) -> Path:
    """A tokenizer.json / tokenizer.model file as given, or the one in a directory (tokenizer.json preferred)."""
    path = Path(path)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _token_text(value, where: str) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string, a {"content": ...}
    dict (an AddedToken), or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or {{\"content\": ...}}, got {json.dumps(value)[:60]}")


class Tokenizer:
    """encode/decode with BOS/EOS/PAD ids. `model_path`: a tokenizer.model, a tokenizer.json, or a directory
    holding either (tokenizer.json preferred). See the module docstring for how special tokens are chosen.

    Attributes: path (the file loaded), backend ("sentencepiece" or "tokenizers"), vocab_size, bos_id (None if
    the tokenizer has no BOS), eos_id, eos_ids, pad_id, unk_id, add_bos, files (the tokenizer files to copy next
    to a saved model), chat_template (str or None), special_tokens (the configured special token strings, the
    variables a chat template sees), and sp (sentencepiece) or tk (tokenizers.Tokenizer).
    """

    def __init__(self, model_path: str | Path):
        path = find_tokenizer_file(model_path)
        self.path = path
        directory = path.parent
        # What a saved model needs beside it: this file, the configs, and the directory's other tokenizer file when
        # this one is the directory's choice (Llama-2 and Mistral ship both; the copy must load the same way).
        present = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
        siblings = present[1:] if present[:1] == [path] else []
        self.files: list[Path] = [path] + siblings + [directory / n for n in CONFIG_FILES if (directory / n).is_file()]
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path)
        special_map = _read_json(directory / "special_tokens_map.json")
        generation = _read_json(directory / "generation_config.json")
        self.chat_template: str | None = self._chat_template(directory, config, config_path)

        # special token strings, as transformers' special_tokens_map has them, and the file each came from
        tokens, source = {}, {}
        sources = [(config_path, config)]
        if "added_tokens_decoder" not in config:  # transformers reads special_tokens_map.json only then
            sources.append((directory / "special_tokens_map.json", special_map))
        for file, values in sources:
            for key, value in values.items():
                if key.endswith("_token") and (value is None or isinstance(value, (str, dict))):
                    tokens[key], source[key] = _token_text(value, f"{file}, '{key}'"), file
        self.special_tokens: dict[str, str] = {k: v for k, v in tokens.items() if v is not None}

        self.sp = self.tk = None
        if path.suffix == ".json":
            self._load_tokenizers(path)
        else:
            self._load_sentencepiece(path)

        def configured(key):
            text = self.special_tokens.get(key)
            if text is None:
                return None
            token_id = self._token_id(text)
            if token_id is None and key != "pad_token":  # a pad_token outside the vocabulary is skipped
                raise ValueError(f"{source[key]}: {key} {text!r} is not in the vocabulary of {path}")
            return token_id

        # BOS
        bos = configured("bos_token")
        if self.sp is not None:
            self.bos_id = bos if bos is not None else (self.sp.bos_id() if self.sp.bos_id() >= 0 else None)
            add_bos = config.get("add_bos_token", True)
            if not isinstance(add_bos, bool):
                raise ValueError(f"{config_path}: add_bos_token must be true or false")
            self.add_bos = add_bos
        else:
            prefix = self._post_processor_prefix()
            if bos is None and len(prefix) == 1:
                bos = prefix[0]  # the post-processor adds a BOS the config does not name
            if prefix and prefix != [bos]:
                raise ValueError(f"{path}: the post-processor puts {prefix} before a text; only a BOS ({bos}) is supported")
            self.bos_id, self.add_bos = bos, bool(prefix)

        # EOS
        eos = configured("eos_token")
        generation_eos = generation.get("eos_token_id")
        generation_eos = [] if generation_eos is None else generation_eos if isinstance(generation_eos, list) else [generation_eos]
        if any(type(i) is not int or not 0 <= i < self.vocab_size for i in generation_eos):
            raise ValueError(f"{directory / 'generation_config.json'}: eos_token_id {generation.get('eos_token_id')} "
                             f"is not an id of {path} (vocabulary {self.vocab_size})")
        if eos is None and self.sp is not None and self.sp.eos_id() >= 0:
            eos = self.sp.eos_id()
        if eos is None and generation_eos:
            eos = generation_eos[0]
        if eos is None or (self.add_bos and self.bos_id is None):
            raise ValueError(f"{path}: the template needs BOS and EOS pieces (bos={self.bos_id}, eos={eos}); set "
                             "bos_token / eos_token in tokenizer_config.json")
        self.eos_id: int = eos
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([eos] + generation_eos))

        # unk and pad
        unk = configured("unk_token")
        if unk is None and self.sp is not None and self.sp.unk_id() >= 0:
            unk = self.sp.unk_id()
        if unk is None and self.tk is not None:
            unk = self._token_id(getattr(self.tk.model, "unk_token", None) or "")
        self.unk_id: int | None = unk
        self.pad_id: int = self._choose_pad(configured("pad_token"))

    # ---------------------------------------------------------------------------------------------
    # loading

    def _load_sentencepiece(self, path: Path):
        self.backend = "sentencepiece"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as error:  # sentencepiece raises OSError/RuntimeError with a terse message
            hint = (" (Llama-3's original/tokenizer.model is a tiktoken file: load the tokenizer.json of the model "
                    "directory instead)" if path.parent.name == "original" else "")
            raise ValueError(f"{path} is not a valid sentencepiece model: {error}{hint}") from error
        self.vocab_size: int = self.sp.vocab_size()

    def _load_tokenizers(self, path: Path):
        self.backend = "tokenizers"
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"{path}: loading a tokenizer.json needs the tokenizers library "
                              "(pip install 'tokenizers>=0.20')") from None
        try:
            self.tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:
            raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error
        self.tk.no_truncation()  # never cut or pad silently (a tokenizer.json may carry either)
        self.tk.no_padding()
        self.vocab_size = max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    @staticmethod
    def _chat_template(directory: Path, config: dict, config_path: Path) -> str | None:
        """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
        {"name", "template"} from which the "default" one is taken), as transformers picks it."""
        if (directory / "chat_template.jinja").is_file():
            try:
                return (directory / "chat_template.jinja").read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{directory / 'chat_template.jinja'}: not UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); save it as UTF-8") from None
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_path}: chat_template must be a string or a list of named templates")
        return template

    def _token_id(self, text: str) -> int | None:
        if self.sp is not None:
            token_id = self.sp.piece_to_id(text)  # unknown pieces map to unk: check the round trip
            return token_id if text and self.sp.id_to_piece(token_id) == text else None
        return self.tk.token_to_id(text) if text else None

    def _post_processor_prefix(self) -> list[int]:
        """The ids the tokenizer.json post-processor puts before a text (what transformers' encode adds)."""
        probe = "Hello world"
        plain = self.tk.encode(probe, add_special_tokens=False).ids
        full = self.tk.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        raise ValueError(f"{self.path}: the post-processor changes the text's own ids; cannot tell what it adds")

    def _choose_pad(self, configured_pad: int | None) -> int:
        """The first that exists: the configured pad_token (even an EOS, as transformers takes it), the
        sentencepiece pad piece, Llama-3.1's <|finetune_right_pad_id|>, Llama-3.0's lowest reserved special
        token, unk, EOS."""
        candidates = [configured_pad]
        if self.sp is not None:
            candidates.append(self.sp.pad_id() if self.sp.pad_id() >= 0 else None)
        else:
            added = {token.content: i for i, token in self.tk.get_added_tokens_decoder().items()}
            candidates.append(added.get("<|finetune_right_pad_id|>"))
            reserved = sorted((int(m.group(1)), i) for text, i in added.items() if (m := _RESERVED.fullmatch(text)))
            candidates.append(reserved[0][1] if reserved else None)
        candidates += [self.unk_id, self.eos_id]
        return next(c for c in candidates if c is not None)

    # ---------------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text` (special tokens not added; for tokenizer.json, special-token text in `text` is parsed as
        transformers does), with [bos_id] in front if bos and [eos_id] after if eos."""
        if bos and self.bos_id is None:
            raise ValueError(f"{self.path}: this tokenizer has no BOS token")
        if self.sp is not None:
            ids = self.sp.EncodeAsIds(text)
        else:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Text of `ids` up to the first EOS (any of eos_ids, excluded); left padding and BOS are dropped.

        generate() rows are prompt + response + eos + pads, and a sampled row may hold junk after its
        EOS; everything after the first EOS is not part of the answer. Leading pad ids are left padding; a
        pad id elsewhere is dropped too unless pad is an EOS id (Qwen), where it cannot be told from a real
        one: pass ids cut by their attention mask then. When pad is unk (LLaMA), unk ids are dropped. Other
        special tokens (a chat template's headers) are kept; no "clean up" of spaces is done
        (transformers >= 5 does none for BPE either).

        stop_at_eos=False decodes everything, EOS ids included as text: use it for a chat-template prompt, whose
        turns end with the EOS token (<|eot_id|>), so that decoding stops at its system or user turn otherwise.
        """
        if hasattr(ids, "tolist"):  # torch tensor or numpy array
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        start = 0
        while start < len(ids) and ids[start] == self.pad_id:
            start += 1
        stop = set(self.eos_ids) if stop_at_eos else set()
        dropped = {self.bos_id} | ({self.pad_id} if self.pad_id not in self.eos_ids else set())
        kept = []
        for i in ids[start:]:
            if i in stop:
                break
            if i not in dropped:
                kept.append(i)
        if self.sp is not None:
            return self.sp.DecodeIds(kept)
        return self.tk.decode(kept, skip_special_tokens=False)

    def for_template(self, template: str) -> "Tokenizer":
        """This tokenizer as `template` uses it (and a check that the template renders and encodes).

        safe_rlhf: itself. chat: a copy whose eos_id is the token the chat template writes after an assistant
        message, its end of turn (Llama-3 <|eot_id|>, Qwen <|im_end|>, Mistral and Llama-2 </s>), and whose eos_ids
        start with it: a response ends, and generation stops, where the template ends an assistant turn. For an
        instruct release that is its eos_token already; for a base release with a chat template it is not
        (Qwen2.5 base ends a text with <|endoftext|>, Llama-3.2 base with <|end_of_text|>), and without this a
        chat-trained base model would end its answers with a token the template never writes after one."""
        encode_prompt(self, "x", template)  # no jinja2, no chat template, or a sentencepiece model: fails here
        if template == "safe_rlhf":
            return self
        end = chat_turn_end(self)
        if end == self.eos_id:
            return self
        out = copy.copy(self)
        out.eos_id, out.eos_ids = end, tuple(dict.fromkeys((end, *self.eos_ids)))
        return out

    def files_to_save(self) -> list:
        """What a saved model folder needs beside its weights: the tokenizer's files (paths, copied), with
        generation_config.json rewritten, as (name, text), when it does not list eos_id among its EOS ids (a
        base release trained on its chat template: transformers' generate must stop at the end of turn too)."""
        files = []
        for f in self.files:
            if f.name == "generation_config.json":
                config = _read_json(f)
                listed = config.get("eos_token_id")
                listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
                if self.eos_id not in listed:
                    config["eos_token_id"] = [self.eos_id, *listed]
                    files.append((f.name, json.dumps(config, indent=2) + "\n"))
                    continue
            files.append(f)
        return files

    def token(self, token_id: int) -> str:
        """The text of one token id (its piece)."""
        return self.sp.id_to_piece(token_id) if self.sp is not None else self.tk.id_to_token(token_id)

    def describe(self) -> str:
        """One line for the logs."""
        eos = ", ".join(f"{i} {self.token(i)}" for i in self.eos_ids)
        bos = "none" if self.bos_id is None else f"{self.bos_id} {self.token(self.bos_id)}" + ("" if self.add_bos else " (not added)")
        return (f"tokenizer {self.path} ({self.backend}): vocabulary {self.vocab_size}, bos {bos}, eos {eos}, "
                f"pad {self.pad_id} {self.token(self.pad_id)}, chat template {'yes' if self.chat_template else 'no'}")

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r})"


# ---------------------------------------------------------------------------------------------
# chat templates (jinja2, as transformers renders them)

def _jinja2():
    try:
        import jinja2
    except ImportError:
        raise ImportError("the chat template (--template chat) needs jinja2: pip install 'jinja2>=3.1'") from None
    return jinja2


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    """The template compiled in transformers' environment: a sandbox, trim_blocks and lstrip_blocks, loop controls,
    its tojson filter, raise_exception and strftime_now (of CHAT_TEMPLATE_DAY, not today), and {% generation %}
    blocks rendered as plain text."""
    jinja2 = _jinja2()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """transformers marks assistant text with {% generation %}...{% endgeneration %}; it renders as is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: no HTML escaping, and json.dumps' options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: CHAT_TEMPLATE_DAY.strftime(format)
    return env.from_string(template)


# The day a chat template's strftime_now() reads: a fixed one, the fallback of Meta's Llama-3.1 template itself.
# Templates that print the date (Llama-3.1/3.2/3.3's "Today Date: 26 Jul 2024", others through strftime_now)
# would otherwise give other ids on another day: a run resumed after midnight would train on other prompts than
# an uninterrupted one, and the stages of one pipeline (or a rerun) on different ones. Pass date_string= (Llama)
# to render another date; transformers' apply_chat_template prints today's unless given one.
CHAT_TEMPLATE_DAY = date(2024, 7, 26)


def render_chat(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The checkpoint's chat template applied to `messages` ([{"role": ..., "content": ...}, ...]), as
    transformers' apply_chat_template(messages, add_generation_prompt=..., tokenize=False) renders it: the
    template sees messages (keys whose value is None dropped), tools=None, documents=None,
    add_generation_prompt, the configured special tokens (bos_token, eos_token, ...), strftime_now (of
    CHAT_TEMPLATE_DAY, not today) and `variables` (e.g. date_string for Llama-3.1/3.2 templates)."""
    if tok.chat_template is None:
        raise ValueError(f"{tok.path}: no chat template (neither chat_template.jinja nor a chat_template in "
                         "tokenizer_config.json); use --template safe_rlhf")
    jinja2 = _jinja2()
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {"tools": None, "documents": None, **tok.special_tokens, **variables}
    try:
        compiled = _compile_chat_template(tok.chat_template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as error:  # a syntax error, or the template's own raise_exception
        line = f", line {error.lineno}" if getattr(error, "lineno", None) else ""
        raise ValueError(f"the chat template of {tok.path.parent}{line} fails: {error.message or error}; fix it "
                         "(chat_template.jinja or tokenizer_config.json), or use --template safe_rlhf") from None


def chat_turn_end(tok: Tokenizer) -> int:
    """The first special token the chat template writes after an assistant message's content (its end of
    turn), found by rendering a short conversation; the tokenizer's eos_id if it writes none."""
    answer = "The answer."
    text = render_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}],
                       add_generation_prompt=False)
    if answer not in text:
        raise ValueError(f"{tok.path}: the chat template does not write an assistant message's content")
    special = {i for i, t in tok.tk.get_added_tokens_decoder().items() if t.special} if tok.tk else set()
    after = tok.encode(text[text.rindex(answer) + len(answer):])
    return next((i for i in after if i in special or i in tok.eos_ids), tok.eos_id)


# ---------------------------------------------------------------------------------------------
# templates

def format_prompt(prompt: str) -> str:
    """The Safe RLHF template up to and including "ASSISTANT:" (no trailing space)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def _check_template(template: str):
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")


def prompt_text(tok: Tokenizer, prompt: str, template: str = "safe_rlhf", **chat_variables) -> str:
    """The prompt part as text: format_prompt(prompt), or the chat template rendered with the generation prompt
    (chat_variables go to the template, e.g. date_string="26 Jul 2024" to pin Llama-3.1/3.2's date line)."""
    _check_template(template)
    if template == "safe_rlhf":
        return format_prompt(prompt)
    return render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True, **chat_variables)


def encode_prompt(tok: Tokenizer, prompt: str, template: str = "safe_rlhf", **chat_variables) -> list[int]:
    """The prompt part's ids: exactly what the policy is given at rollout time.

    safe_rlhf: BOS (when the tokenizer adds one) + the encoded template. chat: the rendered chat template encoded
    as transformers' apply_chat_template tokenizes it (nothing added; the template writes its own BOS)."""
    _check_template(template)
    if template == "safe_rlhf":
        return tok.encode(format_prompt(prompt), bos=tok.add_bos)
    if tok.backend != "tokenizers":
        raise ValueError(f"{tok.path}: the chat template needs a tokenizer.json (sentencepiece would encode the "
                         "special tokens the template writes as plain text); use --template safe_rlhf, or a "
                         "directory with a tokenizer.json")
    return tok.encode(prompt_text(tok, prompt, template, **chat_variables))


def encode_answers(tok: Tokenizer, prompt: str, answers: Sequence[str], template: str = "safe_rlhf",
                   **chat_variables) -> tuple[list[int], list[list[int]]]:
    """(encode_prompt, [encode_prompt + encode(answer) + [eos_id] for each answer]): the prompt encoded once
    for all its answers (a preference pair's two); see the module docstring."""
    prompt_ids = encode_prompt(tok, prompt, template, **chat_variables)
    return prompt_ids, [prompt_ids + tok.encode(answer) + [tok.eos_id] for answer in answers]


def encode_dialogue(tok: Tokenizer, prompt: str, response: str, template: str = "safe_rlhf",
                    **chat_variables) -> tuple[list[int], int]:
    """(encode_prompt + encode(response) + [eos_id], number of prompt tokens); see the module docstring."""
    prompt_ids, (ids,) = encode_answers(tok, prompt, [response], template, **chat_variables)
    return ids, len(prompt_ids)
