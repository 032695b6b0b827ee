"""Loaders: local JSON/JSONL files -> validated examples -> token ids -> padded torch batches.

Files are JSONL (one object per line) or one JSON array of objects; extra fields are ignored.

    SFT          Alpaca {instruction, input, output}: prompt = instruction + " " + input (input optional)
                 or plain {prompt, response}
    preference   PKU-SafeRLHF {prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
                 better_response_id, safer_response_id}
    prompts      {prompt} (PKU-SafeRLHF files work) or Alpaca {instruction, input}; deduplicated

A data argument names one or more files or Hub datasets, each with an optional share (see `parse_sources`):

    "a.jsonl"                    all rows
    "a.jsonl:0.5,b.json:1000"    a random half of a.jsonl and 1000 random rows of b.json (seeded)
    "PKU-Alignment/PKU-SafeRLHF:alpaca-7b:train"
                                 a Hub dataset's subset and split, from the Hugging Face cache (data/hub.py)

Bad input raises DataError naming the file, the line and the field. Preference rows whose safer
answer is labelled unsafe while the other is labelled safe (the public PKU-SafeRLHF data has some)
are skipped and counted for the cost model (the reward model reads only better_response_id and
keeps them). Every loader and tokeniser returns (items, stats) and logs the stats: nothing is
dropped or truncated silently.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .tokenizer import Tokenizer, encode_answers, encode_dialogue, encode_prompt

Log = Callable[[str], None] | None


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


# ---------------------------------------------------------------------------------------------
# examples

@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    response_0: str
    response_1: str
    is_response_0_safe: bool | None  # None: a single-preference row (load_preferences(safety_labels=False))
    is_response_1_safe: bool | None
    better_response_id: int
    safer_response_id: int | None


@dataclass(frozen=True)
class RewardPair:
    prompt: str
    better: str
    worse: str


@dataclass(frozen=True)
class CostPair:
    prompt: str
    safer: str
    less_safe: str
    safer_sign: int      # +1 if the answer is labelled unsafe (harmful), -1 if safe
    less_safe_sign: int


def safety_sign(is_safe: bool) -> int:
    return -1 if is_safe else +1


def reward_pairs(preferences: Sequence[PreferenceExample]) -> list[RewardPair]:
    """(better, worse) by better_response_id: the reward model's training pairs."""
    pairs = []
    for p in preferences:
        responses = (p.response_0, p.response_1)
        pairs.append(RewardPair(p.prompt, responses[p.better_response_id], responses[1 - p.better_response_id]))
    return pairs


def cost_pairs(preferences: Sequence[PreferenceExample]) -> list[CostPair]:
    """(safer, less safe, their safety signs) by safer_response_id: the cost model's training pairs."""
    pairs = []
    for p in preferences:
        responses = (p.response_0, p.response_1)
        safe = (p.is_response_0_safe, p.is_response_1_safe)
        s, u = p.safer_response_id, 1 - p.safer_response_id
        pairs.append(CostPair(p.prompt, responses[s], responses[u], safety_sign(safe[s]), safety_sign(safe[u])))
    return pairs


# ---------------------------------------------------------------------------------------------
# reading files

def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each record of a JSONL file, a JSON array file, or a Parquet file
    (Hugging Face datasets' format; read with pyarrow, an optional dependency; "line" is the row
    number, from 1)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory: name the data files in it (a,b,... or a Hub dataset id)")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".parquet" or magic == b"PAR1":
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file "
                            "to JSONL") from None
        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow's message does not name the file
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
        return [(row_no, _check_object(path, row_no, row)) for row_no, row in enumerate(rows, start=1)]
    text = _decode(path, _decompress(path, path.read_bytes()))
    if text.lstrip().startswith("["):
        return _read_json_array(path, text)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {line_no}: malformed JSON: {error.msg} (column {error.colno})") from None
        records.append((line_no, _check_object(path, line_no, record)))
    return records


# Compressed files, recognised by their first bytes whatever their name (a .jsonl that is really gzip):
# the standard library's decompressors are read; the others are refused by name, with the command that
# unpacks them.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_REFUSED = {b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"), b"PK\x03\x04": ("zip", "unzip")}


def _decompress(path: Path, raw: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    for magic, kind in _COMPRESSED.items():
        if raw.startswith(magic):
            try:
                return {"gzip": gzip, "bz2": bz2, "xz": lzma}[kind].decompress(raw)
            except (OSError, EOFError, ValueError, lzma.LZMAError) as error:  # truncated or damaged
                raise DataError(f"{path}: a damaged {kind} file ({error}); download or compress it again") from None
    for magic, (kind, command) in _REFUSED.items():
        if raw.startswith(magic):
            raise DataError(f"{path} is {kind}-compressed, which is not read here: unpack it ({command} "
                            f"{path.name}) and pass the JSONL, JSON or Parquet file")
    return raw


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text (a byte-order mark tolerated); any other encoding is named with the line of its first
    byte that is not UTF-8, and the way to convert it."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); save the file as "
                        f"UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}") from None


def _read_json_array(path: Path, text: str) -> list[tuple[int, dict]]:
    # Decode element by element so every record keeps the line it starts on.
    decoder = json.JSONDecoder()
    records, pos, line_no, counted_to = [], text.index("[") + 1, 1, 0

    def skip_space(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i):
        nonlocal line_no, counted_to
        line_no += text.count("\n", counted_to, i)
        counted_to = i
        return line_no

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        start_line = line_at(pos)
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: malformed JSON: {error.msg} (column {error.colno})") from None
        records.append((start_line, _check_object(path, start_line, record)))
        pos = skip_space(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[pos + 1:].strip():
            return records
        raise DataError(f"{path}, line {line_at(pos)}: malformed JSON: expected ',' or a final ']'")


def _check_object(path, line_no, record):
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def _fail(path, line_no, field, problem):
    raise DataError(f"{path}, line {line_no}, field '{field}': {problem}")


def _text(path, line_no, record, field, allow_empty=False) -> str:
    if field not in record:
        _fail(path, line_no, field, "missing")
    value = record[field]
    if not isinstance(value, str):
        _fail(path, line_no, field, f"expected a string, got {json.dumps(value)[:40]}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate escape ("\ud83d" without its pair): no tokenizer takes it
        _fail(path, line_no, field, f"the escape \\u{ord(value[error.start]):04x} at character {error.start} is half "
                                    "of a UTF-16 surrogate pair, not text: write the whole character (or both halves)")
    if not allow_empty and not value.strip():
        _fail(path, line_no, field, "empty")
    return value


def _bool(path, line_no, record, field) -> bool:
    if field not in record:
        _fail(path, line_no, field, "missing")
    if not isinstance(record[field], bool):
        _fail(path, line_no, field, f"expected true or false, got {json.dumps(record[field])[:40]}")
    return record[field]


def _response_id(path, line_no, record, field) -> int:
    if field not in record:
        _fail(path, line_no, field, "missing")
    value = record[field]
    if type(value) is not int or value not in (0, 1):  # bool is an int subclass: rejected too
        _fail(path, line_no, field, f"expected 0 or 1, got {json.dumps(value)[:40]}")
    return value


def _prompt_of(path, line_no, record) -> str:
    """`prompt`, or Alpaca `instruction` + " " + `input` (input optional: absent, null or empty)."""
    if "prompt" in record or "instruction" not in record:
        return _text(path, line_no, record, "prompt")
    instruction = _text(path, line_no, record, "instruction")
    # null: a Parquet or Arrow column with missing values (a data set's optional field) gives None
    extra = _text(path, line_no, record, "input", allow_empty=True) if record.get("input") is not None else ""
    return f"{instruction} {extra}" if extra.strip() else instruction


# ---------------------------------------------------------------------------------------------
# several files, each with a share

@dataclass(frozen=True)
class Source:
    path: Path                     # a file, or a Hub dataset spec (org/name[:subset][:split]), as named in messages
    fraction: float | None = None  # a random fraction of the usable rows, in (0, 1]
    count: int | None = None       # or this many random rows
    files: tuple[Path, ...] = ()   # what is read: the file itself, or the files of the dataset's split

    def __post_init__(self):
        if not self.files:
            object.__setattr__(self, "files", (self.path,))


def _source(name: str, **share) -> Source:
    """A local file, or, when no such file exists and it reads as one, a Hub dataset id (data/hub.py)."""
    from .hub import HubError, is_hub_id, resolve_dataset

    if not Path(name).exists() and is_hub_id(name.split(":")[0]):
        try:
            return Source(Path(name), files=resolve_dataset(name).files, **share)
        except HubError as error:  # perhaps a mistyped local path: say both
            raise DataError(f"no data file {name}, and as a Hub dataset: {error}") from None
    return Source(Path(name), **share)


def parse_sources(spec: str | Path | Sequence[str | Path]) -> list[Source]:
    """"a.jsonl:0.5,b.json:1000" -> sources. A suffix with a decimal point is a fraction, an integer a
    count; a suffix that is not a number is part of the path. Paths cannot contain commas. A Hub
    dataset id takes the same suffix after its subset and split:
    "PKU-Alignment/PKU-SafeRLHF:alpaca-7b:train:1000" (see data/hub.py)."""
    parts = [str(p) for p in spec] if isinstance(spec, (list, tuple)) else str(spec).split(",")
    sources = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        path, colon, amount = part.rpartition(":")
        if colon and amount.replace(".", "", 1).isdigit():
            if "." in amount:
                fraction = float(amount)
                if not 0 < fraction <= 1:
                    raise ValueError(f"{part!r}: a fraction must be in (0, 1]")
                sources.append(_source(path, fraction=fraction))
            else:
                if int(amount) < 1:
                    raise ValueError(f"{part!r}: a count must be at least 1")
                sources.append(_source(path, count=int(amount)))
        else:
            sources.append(_source(part))
    if not sources:
        raise ValueError(f"no data files in {spec!r}")
    return sources


def _select(items: list, source: Source, rng: random.Random) -> list:
    if source.fraction is None and source.count is None:
        return items
    n = round(source.fraction * len(items)) if source.fraction is not None else source.count
    if n > len(items):
        raise DataError(f"{source.path}: asks for {n} rows but has only {len(items)} usable ones")
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]  # file order kept


def _share(source: Source) -> str:
    if source.fraction is not None:
        return f" (fraction {source.fraction})"
    return f" (count {source.count})" if source.count is not None else ""


@dataclass
class LoadStats:
    kind: str
    rows: int = 0                  # valid rows read
    skipped_inconsistent: int = 0  # preference rows: safer answer unsafe while the other is safe
    duplicates: int = 0            # prompts: repeated prompts removed
    used: int = 0

    def __str__(self):
        extra = f", skipped {self.skipped_inconsistent} inconsistent" if self.skipped_inconsistent else ""
        extra += f", removed {self.duplicates} duplicates" if self.duplicates else ""
        return f"{self.kind}: {self.rows} rows read{extra}, {self.used} used in total"


def _load(kind: str, spec, parse_file, seed: int, log: Log):
    rng = random.Random(seed)
    stats, examples = LoadStats(kind), []
    for source in parse_sources(spec):
        items, skipped, duplicates = [], 0, 0
        for path in source.files:
            file_items, file_skipped, file_duplicates = parse_file(path)
            items, skipped, duplicates = items + file_items, skipped + file_skipped, duplicates + file_duplicates
        chosen = _select(items, source, rng)
        stats.rows += len(items) + skipped + duplicates
        stats.skipped_inconsistent += skipped
        stats.duplicates += duplicates
        examples += chosen
        if log:
            note = f", skipped {skipped} rows whose safer answer is labelled unsafe and the other safe" if skipped else ""
            note += f", removed {duplicates} duplicate prompts" if duplicates else ""
            log(f"{kind}: {source.path}: {len(items) + skipped + duplicates} rows{note}, using {len(chosen)}{_share(source)}")
    return examples, stats


def _finish(examples, stats: LoadStats, log: Log):
    stats.used = len(examples)
    if log:
        log(str(stats))
    return examples, stats


def load_sft(spec, seed: int = 0, log: Log = print) -> tuple[list[SFTExample], LoadStats]:
    def parse_file(path):
        examples = []
        for line_no, record in read_records(path):
            if "instruction" in record:
                prompt, response = _prompt_of(path, line_no, record), _text(path, line_no, record, "output")
            elif "prompt" in record:
                prompt, response = _text(path, line_no, record, "prompt"), _text(path, line_no, record, "response")
            else:
                _fail(path, line_no, "prompt", "missing (an SFT record needs prompt and response, or Alpaca "
                                               "instruction, input and output)")
            examples.append(SFTExample(prompt, response))
        return examples, 0, 0

    return _finish(*_load("sft", spec, parse_file, seed, log), log)


def load_preferences(spec, seed: int = 0, log: Log = print, drop_inconsistent: bool = True,
                     safety_labels: bool = True) -> tuple[list[PreferenceExample], LoadStats]:
    """PKU-SafeRLHF rows. Inconsistent rows (safer answer labelled unsafe, the other safe) are
    dropped by default: the cost model's sign and ranking terms would contradict each other. The
    reward model reads no safety label and keeps them (drop_inconsistent=False), as the authors'
    reward dataset does; with safety_labels=False rows need none at all (the single-preference schema of
    PKU-SafeRLHF-single-dimension: prompt, response_0, response_1, better_response_id)."""

    def safety(path, line_no, r, field, parse):
        return parse(path, line_no, r, field) if safety_labels or field in r else None

    def parse_file(path):
        examples, inconsistent = [], 0
        for line_no, r in read_records(path):
            example = PreferenceExample(
                prompt=_text(path, line_no, r, "prompt"),
                response_0=_text(path, line_no, r, "response_0"),
                response_1=_text(path, line_no, r, "response_1"),
                is_response_0_safe=safety(path, line_no, r, "is_response_0_safe", _bool),
                is_response_1_safe=safety(path, line_no, r, "is_response_1_safe", _bool),
                better_response_id=_response_id(path, line_no, r, "better_response_id"),
                safer_response_id=safety(path, line_no, r, "safer_response_id", _response_id),
            )
            safe = (example.is_response_0_safe, example.is_response_1_safe)
            if (drop_inconsistent and safety_labels and not safe[example.safer_response_id]
                    and safe[1 - example.safer_response_id]):
                inconsistent += 1
                continue
            examples.append(example)
        return examples, inconsistent, 0

    return _finish(*_load("preference", spec, parse_file, seed, log), log)


def load_prompts(spec, seed: int = 0, log: Log = print) -> tuple[list[str], LoadStats]:
    def parse_file(path):
        prompts = [_prompt_of(path, line_no, record) for line_no, record in read_records(path)]
        unique = list(dict.fromkeys(prompts))
        return unique, 0, len(prompts) - len(unique)

    prompts, stats = _load("prompts", spec, parse_file, seed, log)
    unique = list(dict.fromkeys(prompts))  # the same prompt in two files
    stats.duplicates += len(prompts) - len(unique)
    return _finish(unique, stats, log)


def load_eval_prompts(spec, seed: int = 0, log: Log = print) -> tuple[list[dict], LoadStats]:
    """Evaluation prompts: each record with "prompt" (str, from any prompt form) and "harmful" (bool,
    or None where the record has no label: red-team sets may not) set; other fields (the embedded
    task's "heldout" kind) are kept. Repeated prompts are kept: they are separate evaluation items."""
    def parse_file(path):
        rows = [{**record, "prompt": _prompt_of(path, line_no, record),
                 "harmful": _bool(path, line_no, record, "harmful") if "harmful" in record else None}
                for line_no, record in read_records(path)]
        return rows, 0, 0

    return _finish(*_load("eval prompts", spec, parse_file, seed, log), log)


def split_train_eval(items: Sequence, eval_size: float | int, seed: int = 0) -> tuple[list, list]:
    """Random (train, eval) split; eval_size is a fraction in (0, 1) or a count."""
    n = len(items)
    n_eval = round(eval_size * n) if isinstance(eval_size, float) else int(eval_size)
    if not 0 <= n_eval <= n:
        raise ValueError(f"eval size {eval_size} does not fit {n} items")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in eval_ids], [x for i, x in enumerate(items) if i in eval_ids]


# ---------------------------------------------------------------------------------------------
# tokenisation with the template

@dataclass
class TokenStats:
    kind: str
    max_length: int
    total: int = 0
    kept: int = 0
    truncated: int = 0                # SFT: kept, cut at max_length, so it lost its EOS
    dropped_prompt_too_long: int = 0  # the prompt alone leaves no room for a response token
    dropped_no_eos: int = 0           # pairs: an answer would lose its EOS, where its score is read
    longest: int = 0                  # longest sequence before truncation

    def __str__(self):
        parts = [f"{self.kind}: {self.kept}/{self.total} kept (max length {self.max_length}, longest {self.longest})"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated (lost their EOS)")
        if self.dropped_prompt_too_long:
            parts.append(f"{self.dropped_prompt_too_long} dropped: prompt too long")
        if self.dropped_no_eos:
            parts.append(f"{self.dropped_no_eos} dropped: an answer would lose its EOS")
        return ", ".join(parts)


@dataclass(frozen=True)
class TokenizedSFT:
    input_ids: list[int]
    n_prompt: int  # tokens before the response: the loss covers input_ids[n_prompt:]


@dataclass(frozen=True)
class TokenizedRewardPair:
    better_ids: list[int]
    worse_ids: list[int]


@dataclass(frozen=True)
class TokenizedCostPair:
    safer_ids: list[int]
    less_safe_ids: list[int]
    safer_sign: int
    less_safe_sign: int


def tokenize_sft(tok: Tokenizer, examples: Sequence[SFTExample], max_length: int,
                 log: Log = print, template: str = "safe_rlhf") -> tuple[list[TokenizedSFT], TokenStats]:
    """Template + truncation. Kept when truncated (its response tokens still teach), dropped when the
    prompt alone fills max_length."""
    stats, out = TokenStats("sft tokens", max_length, total=len(examples)), []
    for ex in examples:
        ids, n_prompt = encode_dialogue(tok, ex.prompt, ex.response, template)
        stats.longest = max(stats.longest, len(ids))
        if n_prompt >= max_length:
            stats.dropped_prompt_too_long += 1
            continue
        if len(ids) > max_length:
            ids = ids[:max_length]
            stats.truncated += 1
        out.append(TokenizedSFT(ids, n_prompt))
    stats.kept = len(out)
    if log:
        log(str(stats))
    return out, stats


def _tokenize_answers(tok, prompt, answers, max_length, stats, template) -> list[list[int]] | None:
    """Both answers of a pair, or None (counted) if either would not fit with its EOS."""
    prompt_ids, sequences = encode_answers(tok, prompt, answers, template)
    stats.longest = max(stats.longest, *map(len, sequences))
    if len(prompt_ids) >= max_length:
        stats.dropped_prompt_too_long += 1
        return None
    if any(len(s) > max_length for s in sequences):
        stats.dropped_no_eos += 1
        return None
    return sequences


def tokenize_reward_pairs(tok: Tokenizer, pairs: Sequence[RewardPair], max_length: int,
                          log: Log = print, template: str = "safe_rlhf") -> tuple[list[TokenizedRewardPair], TokenStats]:
    """Pairs whose answers do not fit with their EOS are dropped: the reward is read at the EOS."""
    stats, out = TokenStats("reward pair tokens", max_length, total=len(pairs)), []
    for pair in pairs:
        sequences = _tokenize_answers(tok, pair.prompt, (pair.better, pair.worse), max_length, stats, template)
        if sequences:
            out.append(TokenizedRewardPair(*sequences))
    stats.kept = len(out)
    if log:
        log(str(stats))
    return out, stats


def tokenize_cost_pairs(tok: Tokenizer, pairs: Sequence[CostPair], max_length: int,
                        log: Log = print, template: str = "safe_rlhf") -> tuple[list[TokenizedCostPair], TokenStats]:
    """As tokenize_reward_pairs, keeping each answer's safety sign."""
    stats, out = TokenStats("cost pair tokens", max_length, total=len(pairs)), []
    for pair in pairs:
        sequences = _tokenize_answers(tok, pair.prompt, (pair.safer, pair.less_safe), max_length, stats, template)
        if sequences:
            out.append(TokenizedCostPair(*sequences, pair.safer_sign, pair.less_safe_sign))
    stats.kept = len(out)
    if log:
        log(str(stats))
    return out, stats


def tokenize_prompts(tok: Tokenizer, prompts: Sequence[str], max_length: int,
                     log: Log = print, template: str = "safe_rlhf") -> tuple[list[list[int]], TokenStats]:
    """encode_prompt of each prompt; prompts longer than max_length are dropped (never cut: a cut
    prompt would lose the "ASSISTANT:" the policy answers after)."""
    stats, out = TokenStats("prompt tokens", max_length, total=len(prompts)), []
    for prompt in prompts:
        ids = encode_prompt(tok, prompt, template)
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_length:
            stats.dropped_prompt_too_long += 1
            continue
        out.append(ids)
    stats.kept = len(out)
    if log:
        log(str(stats))
    return out, stats


# ---------------------------------------------------------------------------------------------
# collators: lists of ids -> padded tensors. Use with functools.partial(collate_x, pad_id=tok.pad_id).
# attention_mask is 1 on real tokens and 0 on padding (torch.long, as in Hugging Face).

def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [B, length or the longest]."""
    length = length or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def collate_sft(batch: Sequence[TokenizedSFT], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padded. loss_mask [B, T] (bool) is True on response tokens and the EOS: the targets.

    Next-token loss: logits[:, :-1] predict input_ids[:, 1:], weighted by loss_mask[:, 1:].
    """
    input_ids, attention_mask = pad_sequences([ex.input_ids for ex in batch], pad_id, "right")
    loss_mask = attention_mask.bool()
    for row, ex in enumerate(batch):
        loss_mask[row, :ex.n_prompt] = False
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_reward_pairs(batch: Sequence[TokenizedRewardPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padded, both halves to the same length so they can be concatenated into one forward pass.
    The reward is the score at each row's last real token (attention_mask.sum(-1) - 1), its EOS."""
    length = max(len(s) for ex in batch for s in (ex.better_ids, ex.worse_ids))
    better_ids, better_mask = pad_sequences([ex.better_ids for ex in batch], pad_id, "right", length)
    worse_ids, worse_mask = pad_sequences([ex.worse_ids for ex in batch], pad_id, "right", length)
    return {"better_input_ids": better_ids, "better_attention_mask": better_mask,
            "worse_input_ids": worse_ids, "worse_attention_mask": worse_mask}


def collate_cost_pairs(batch: Sequence[TokenizedCostPair], pad_id: int) -> dict[str, torch.Tensor]:
    """As collate_reward_pairs, plus each answer's safety sign as float [B] (+1 unsafe, -1 safe)."""
    length = max(len(s) for ex in batch for s in (ex.safer_ids, ex.less_safe_ids))
    safer_ids, safer_mask = pad_sequences([ex.safer_ids for ex in batch], pad_id, "right", length)
    less_safe_ids, less_safe_mask = pad_sequences([ex.less_safe_ids for ex in batch], pad_id, "right", length)
    return {"safer_input_ids": safer_ids, "safer_attention_mask": safer_mask,
            "less_safe_input_ids": less_safe_ids, "less_safe_attention_mask": less_safe_mask,
            "safer_sign": torch.tensor([float(ex.safer_sign) for ex in batch]),
            "less_safe_sign": torch.tensor([float(ex.less_safe_sign) for ex in batch])}


def collate_prompts(batch: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padded, for generation: every prompt ends at the last column, where sampling continues."""
    input_ids, attention_mask = pad_sequences(batch, pad_id, "left")
    return {"input_ids": input_ids, "attention_mask": attention_mask}
