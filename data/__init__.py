"""Data layer: tokenizer and template, loaders and collators, the synthetic safety task and its judge.

    tokenizer.py  Tokenizer (sentencepiece), format_prompt, encode_prompt, encode_dialogue
    loaders.py    load_sft / load_preferences / load_prompts, pairs, tokenize_*, collate_*
    world.py      the synthetic world: tasks, steps, phrasings, response wordings
    judge.py      judge(prompt, response): ground-truth helpfulness and harm of any text
    synthetic.py  ensure_synthetic(dir, seed) and `python -m data.synthetic`

Knows nothing of the model or the training stages. See data/README.md for the formats.
"""

# (the judge function is not re-exported: `data.judge` stays the module; use `from data.judge import judge`)
from .loaders import (CostPair, DataError, LoadStats, PreferenceExample, RewardPair, SFTExample, TokenizedCostPair,
                      TokenizedRewardPair, TokenizedSFT, TokenStats, collate_cost_pairs, collate_prompts,
                      collate_reward_pairs, collate_sft, cost_pairs, load_preferences, load_prompts, load_sft,
                      pad_sequences, parse_sources, read_records, reward_pairs, split_train_eval, tokenize_cost_pairs,
                      tokenize_prompts, tokenize_reward_pairs, tokenize_sft)
from .tokenizer import PROMPT_TEMPLATE, Tokenizer, encode_dialogue, encode_prompt, format_prompt

__all__ = [
    "Tokenizer", "PROMPT_TEMPLATE", "format_prompt", "encode_prompt", "encode_dialogue",
    "DataError", "SFTExample", "PreferenceExample", "RewardPair", "CostPair", "LoadStats", "TokenStats",
    "TokenizedSFT", "TokenizedRewardPair", "TokenizedCostPair",
    "read_records", "parse_sources", "load_sft", "load_preferences", "load_prompts", "split_train_eval",
    "reward_pairs", "cost_pairs", "tokenize_sft", "tokenize_reward_pairs", "tokenize_cost_pairs", "tokenize_prompts",
    "pad_sequences", "collate_sft", "collate_reward_pairs", "collate_cost_pairs", "collate_prompts",
    "SyntheticConfig", "SyntheticPaths", "ensure_synthetic",
]


def __getattr__(name):
    # synthetic.py is imported on first use, so that `python -m data.synthetic` does not import it twice
    if name in ("SyntheticConfig", "SyntheticPaths", "ensure_synthetic"):
        from . import synthetic
        return getattr(synthetic, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
