"""Sentencepiece tokenizer and the Safe RLHF conversation template.

A thin wrapper over sentencepiece: a real LLaMA / Llama-2 `tokenizer.model` works as is, and so does
the one the synthetic task trains (data/synthetic.py uses LLaMA's trainer settings, so both take the
same code path).

The template (SAFE_RLHF.md):

    BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}<eos>

with BOS in front. The prompt part and the response are encoded SEPARATELY and the ids concatenated
(`encode_dialogue`). Why: at rollout time the policy is given exactly `encode_prompt(prompt)` and
samples the response token by token after it, so the response can never merge with the prompt's
last characters. Encoding the whole string at once would let sentencepiece merge across the
boundary (":" with the first word, say), so SFT and the reward/cost models would train on a
tokenisation the policy never produces. Encoded separately, sentencepiece's dummy prefix puts a
word-start marker on the response's first token, which shows as one space after "ASSISTANT:" in
decoded text; in token space the template is the same in training and in generation.

Padding: pad must differ from eos, or the "last non-pad token" (where reward and cost are read)
moves off the EOS. If the model defines a pad piece we use it; LLaMA's tokenizer.model has none
(pad_id = -1), so we pad with unk (id 0), which a well-formed prompt never produces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import sentencepiece as spm

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def resolve_pad_id(pad_id: int, unk_id: int, eos_id: int) -> int:
    """The id to pad with: the model's pad piece, else unk; never eos."""
    chosen = pad_id if pad_id >= 0 else unk_id
    if chosen < 0:
        raise ValueError("tokenizer defines neither a pad nor an unk piece; cannot choose a pad id")
    if chosen == eos_id:
        raise ValueError(
            f"pad id {chosen} equals eos id {eos_id}: end scores are read at the last non-pad "
            "token, so pad must differ from eos (use a tokenizer with a distinct pad or unk piece)"
        )
    return chosen


class Tokenizer:
    """encode/decode with BOS/EOS/PAD ids; `model_path` is a tokenizer.model or a directory holding one."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as error:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise ValueError(f"{path} is not a valid sentencepiece model: {error}") from error
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the template needs BOS and EOS pieces (bos={self.bos_id}, eos={self.eos_id})")
        self.pad_id: int = resolve_pad_id(self.sp.pad_id(), self.sp.unk_id(), self.eos_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS (excluded); BOS and pad ids are dropped.

        generate() rows are prompt + response + eos + pads, and a sampled row may hold junk after its
        EOS; everything after the first EOS is not part of the answer. Note: when pad is unk (LLaMA),
        unk ids are dropped too.
        """
        if hasattr(ids, "tolist"):  # torch tensor or numpy array
            ids = ids.tolist()
        kept = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.bos_id and i != self.pad_id:
                kept.append(int(i))
        return self.sp.DecodeIds(kept)


def format_prompt(prompt: str) -> str:
    """The template up to and including "ASSISTANT:" (no trailing space)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """BOS + the templated prompt: exactly what the policy is given at rollout time."""
    return tok.encode(format_prompt(prompt), bos=True)


def encode_dialogue(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(encode_prompt + encode(response) + [eos], number of prompt tokens); see the module docstring."""
    prompt_ids = encode_prompt(tok, prompt)
    return prompt_ids + tok.encode(response) + [tok.eos_id], len(prompt_ids)
