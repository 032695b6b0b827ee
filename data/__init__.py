"""Data layer: tokenizer and template, loaders and collators, the synthetic safety task and its judge.

    tokenizer.py  Tokenizer, format_prompt, encode_prompt, encode_dialogue
    loaders.py    load_sft / load_preferences / load_prompts, pairs, tokenize_*, collate_*
    world.py      the synthetic world: tasks, steps, phrasings, response wordings
    judge.py      judge(prompt, response): ground-truth helpfulness and harm of any text
    synthetic.py  ensure_synthetic(dir, seed) and `python -m data.synthetic`

Import from the modules (`from data.loaders import load_sft`). Knows nothing of the model or the
training stages. See data/README.md for the formats.
"""
