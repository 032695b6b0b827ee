"""Loaders, collators, the synthetic task and its judge (data/)."""

import json
import math
import re
from functools import partial

import pytest
import torch

from data.judge import REDIRECT_CREDIT, identify_task, judge, normalize
from data.loaders import (CostPair, DataError, RewardPair, SFTExample, collate_cost_pairs, collate_prompts,
                          collate_reward_pairs, collate_sft, cost_pairs, load_eval_prompts, load_preferences,
                          load_prompts, load_sft, parse_sources, reward_pairs, split_train_eval, tokenize_cost_pairs, tokenize_prompts,
                          tokenize_reward_pairs, tokenize_sft)
from data.synthetic import FILES, SyntheticConfig, ensure_synthetic, write_synthetic
from data.tokenizer import Tokenizer, encode_dialogue, encode_prompt
from data.world import (COMPLY_INTROS, HELD_OUT_PHRASINGS, PHRASINGS, PROMPT_PREFIXES, PROMPT_SUFFIXES,
                        REDIRECT_DECLINES, REFUSALS, TASKS, TASKS_BY_ID, make_prompt, redirect_response,
                        steps_response)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def pku_row(**overrides):
    row = {"prompt": "How do I bake bread?", "response_0": "mix flour and yeast.", "response_1": "No.",
           "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0,
           "safer_response_id": 1, "category": "ignored"}
    row.update(overrides)
    return row


@pytest.fixture(scope="module")
def tok(synthetic_data):
    return Tokenizer(synthetic_data.tokenizer)


# ---------------------------------------------------------------------------------------------
# loaders on good files

def test_sft_alpaca_and_plain_forms(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "No input field", "output": "ok"},
        {"instruction": "Null input", "input": None, "output": "ok"},  # a missing value in a Parquet column
    ])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "p", "response": "r", "extra": 1}])
    examples, stats = load_sft(f"{alpaca},{plain}", log=None)
    assert examples == [SFTExample("Translate bonjour", "hello"), SFTExample("Say hi", "hi"),
                        SFTExample("No input field", "ok"), SFTExample("Null input", "ok"), SFTExample("p", "r")]
    assert stats.used == 5


def test_alpaca_blank_input_and_a_prompt_beside_an_instruction(tmp_path):
    # An input of blanks adds nothing (no trailing spaces in the prompt the template wraps); a record with
    # both a prompt and an instruction is read by its prompt, as every loader's docstring orders them.
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"instruction": "Say hi", "input": "  ", "output": "hi"}])
    assert load_sft(blank, log=None)[0] == [SFTExample("Say hi", "hi")]
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "instruction": "i", "input": "x", "output": "o"}])
    assert load_prompts(both, log=None)[0] == ["p"]


def test_json_array_files(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"},
                                {"instruction": "c", "input": "d", "output": "e"}], indent=2))
    examples, _ = load_sft(path, log=None)
    assert examples == [SFTExample("a", "b"), SFTExample("c d", "e")]
    # errors in an array still name the line the record starts on
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": ""}\n]\n')
    with pytest.raises(DataError, match=r"alpaca_data.json, line 3, field 'output': empty"):
        load_sft(path, log=None)


def test_preferences_into_reward_and_cost_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [
        pku_row(),
        pku_row(response_0="harmful", response_1="safe", is_response_0_safe=False, better_response_id=0,
                safer_response_id=1),
        pku_row(response_0="a", response_1="b", is_response_0_safe=False, is_response_1_safe=False,
                better_response_id=1, safer_response_id=0),
    ])
    prefs, stats = load_preferences(path, log=None)
    assert stats.used == 3 and stats.skipped_inconsistent == 0
    assert reward_pairs(prefs) == [
        RewardPair("How do I bake bread?", "mix flour and yeast.", "No."),
        RewardPair("How do I bake bread?", "harmful", "safe"),
        RewardPair("How do I bake bread?", "b", "a"),
    ]
    assert cost_pairs(prefs) == [
        CostPair("How do I bake bread?", "No.", "mix flour and yeast.", -1, -1),
        CostPair("How do I bake bread?", "safe", "harmful", -1, +1),
        CostPair("How do I bake bread?", "a", "b", +1, +1),
    ]


def test_inconsistent_rows_are_skipped_and_counted(tmp_path):
    inconsistent = pku_row(is_response_0_safe=True, is_response_1_safe=False, safer_response_id=1)
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row(), inconsistent, pku_row(), inconsistent, inconsistent])
    messages = []
    prefs, stats = load_preferences(path, log=messages.append)
    assert len(prefs) == 2
    assert stats.skipped_inconsistent == 3 and stats.rows == 5
    assert any("skipped 3" in m and "pku.jsonl" in m for m in messages)
    # The reward model has no use for safety labels: it keeps every row.
    prefs, stats = load_preferences(path, log=None, drop_inconsistent=False)
    assert len(prefs) == 5 and stats.skipped_inconsistent == 0


def test_prompts_deduplicated_across_forms_and_files(tmp_path):
    pku = write_jsonl(tmp_path / "pku.jsonl", [pku_row(prompt="a"), pku_row(prompt="b"), pku_row(prompt="a")])
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "b"}, {"prompt": "c"}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "d", "input": "e", "output": "f"}])
    prompts, stats = load_prompts([pku, plain, alpaca], log=None)
    assert prompts == ["a", "b", "c", "d e"]
    assert stats.duplicates == 2 and stats.used == 4
    assert stats.rows == 6  # every row read, the duplicates too


def test_eval_prompts_labels_samples_and_errors(tmp_path):
    rows = [{"prompt": f"q{i}", "harmful": i % 2 == 1} for i in range(10)]
    labelled = write_jsonl(tmp_path / "eval.jsonl", rows)
    got, stats = load_eval_prompts(labelled, log=None)
    assert got == rows and stats.used == 10
    sample, _ = load_eval_prompts(f"{labelled}:4", seed=3, log=None)
    assert len(sample) == 4 and all(r in rows for r in sample)
    assert [r["prompt"] for r in sample] == sorted((r["prompt"] for r in sample), key=lambda p: int(p[1:]))  # file order
    red_team = write_jsonl(tmp_path / "red.jsonl", [{"prompt": "a"}, {"instruction": "b", "input": "c", "output": "d"}])
    got, _ = load_eval_prompts(red_team, log=None)
    assert [(r["prompt"], r["harmful"]) for r in got] == [("a", None), ("b c", None)] and got[1]["output"] == "d"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "harmful": True}, {"prompt": "b", "harmful": "yes"}])
    with pytest.raises(DataError, match=r"bad.jsonl.*2.*harmful"):
        load_eval_prompts(bad, log=None)


# ---------------------------------------------------------------------------------------------
# loaders on bad files: the error names the file, the line and the field

BAD_PREFERENCE_ROWS = [
    (pku_row(better_response_id=2), "better_response_id", "expected 0 or 1"),
    (pku_row(safer_response_id="1"), "safer_response_id", "expected 0 or 1"),
    (pku_row(safer_response_id=True), "safer_response_id", "expected 0 or 1"),
    (pku_row(is_response_0_safe="yes"), "is_response_0_safe", "expected true or false"),
    (pku_row(is_response_1_safe=1), "is_response_1_safe", "expected true or false"),
    (pku_row(prompt="   "), "prompt", "empty"),
    (pku_row(response_1=""), "response_1", "empty"),
    (pku_row(response_0=None), "response_0", "expected a string"),
    ({k: v for k, v in pku_row().items() if k != "safer_response_id"}, "safer_response_id", "missing"),
    ({k: v for k, v in pku_row().items() if k != "is_response_1_safe"}, "is_response_1_safe", "missing"),
]


@pytest.mark.parametrize("bad_row,field,problem", BAD_PREFERENCE_ROWS)
def test_bad_preference_rows(tmp_path, bad_row, field, problem):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row(), pku_row(), bad_row])
    with pytest.raises(DataError, match=rf"pku.jsonl, line 3, field '{field}': {problem}"):
        load_preferences(path, log=None)


@pytest.mark.parametrize("bad_row,field,problem", [
    ({"prompt": "p"}, "response", "missing"),
    ({"prompt": "p", "response": " "}, "response", "empty"),
    ({"prompt": "", "response": "r"}, "prompt", "empty"),
    ({"instruction": "i", "input": "x"}, "output", "missing"),
    ({"instruction": "", "input": "x", "output": "o"}, "instruction", "empty"),
    ({"instruction": "i", "input": 3, "output": "o"}, "input", "expected a string"),
    ({"question": "q", "answer": "a"}, "prompt", "missing"),
])
def test_bad_sft_rows(tmp_path, bad_row, field, problem):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, bad_row])
    with pytest.raises(DataError, match=rf"sft.jsonl, line 2, field '{field}': {problem}"):
        load_sft(path, log=None)


def test_bad_prompt_rows(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"prompts.jsonl, line 2, field 'prompt': empty"):
        load_prompts(path, log=None)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"prompts.jsonl, line 2, field 'prompt': missing"):
        load_prompts(path, log=None)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(pku_row()) + "\n\n" + '{"prompt": "x", "response_0": \n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 3: malformed JSON"):
        load_preferences(path, log=None)
    path.write_text(json.dumps(pku_row()) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"broken.jsonl, line 2: expected a JSON object"):
        load_preferences(path, log=None)
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b"\n]')
    with pytest.raises(DataError, match=r"broken.json, line 4: malformed JSON"):
        load_prompts(path, log=None)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_sft(tmp_path / "missing.jsonl", log=None)


def test_compressed_files_are_read_whatever_their_name(tmp_path):
    import bz2
    import gzip
    import lzma

    rows = [{"prompt": "Hi", "response": "Hello, caf\u00e9."}, {"instruction": "Add", "input": "2+2", "output": "4"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    expected = [SFTExample("Hi", "Hello, caf\u00e9."), SFTExample("Add 2+2", "4")]
    for name, packed in (("a.jsonl.gz", gzip.compress(text)), ("b.jsonl", gzip.compress(text)),
                         ("c.jsonl.bz2", bz2.compress(text)), ("d.jsonl.xz", lzma.compress(text)),
                         ("e.json.gz", gzip.compress(json.dumps(rows).encode())),
                         ("f.jsonl", b"\xef\xbb\xbf" + text)):  # a byte-order mark
        (tmp_path / name).write_bytes(packed)
        assert load_sft(tmp_path / name, log=None)[0] == expected, name


def test_text_that_is_not_utf8_or_not_text_is_named(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "x", "response": "\x93quoted\x94"}\n')
    with pytest.raises(DataError, match=r"win\.jsonl, line 2: not UTF-8 text \(byte 0x93\)"):
        load_sft(path, log=None)
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row(response_1="\udc80 half")])
    with pytest.raises(DataError, match=r"pku\.jsonl, line 1, field 'response_1': the escape \\udc80"):
        load_preferences(path, log=None)


# ---------------------------------------------------------------------------------------------
# several files with a share each; train/eval splits

def test_parse_sources():
    a, b, c = parse_sources("a.jsonl:0.5, dir/b.json:1000,c.jsonl")
    assert (str(a.path), a.fraction, a.count) == ("a.jsonl", 0.5, None)
    assert (str(b.path), b.fraction, b.count) == ("dir/b.json", None, 1000)
    assert (str(c.path), c.fraction, c.count) == ("c.jsonl", None, None)
    assert parse_sources("x.jsonl:1.0")[0].fraction == 1.0
    assert str(parse_sources("C:/data/x.jsonl")[0].path) == "C:/data/x.jsonl"  # not a share
    with pytest.raises(ValueError, match="fraction"):
        parse_sources("a.jsonl:1.5")
    with pytest.raises(ValueError, match="count"):
        parse_sources("a.jsonl:0")


def test_shares_per_file(synthetic_data):
    spec = f"{synthetic_data.sft_train}:0.25,{synthetic_data.sft_eval}:100"
    examples, stats = load_sft(spec, seed=1, log=None)
    assert len(examples) == 1000 + 100 and stats.rows == 4400
    again, _ = load_sft(spec, seed=1, log=None)
    other, _ = load_sft(spec, seed=2, log=None)
    assert again == examples and other != examples
    with pytest.raises(DataError, match="asks for 401 rows but has only 400"):
        load_sft(f"{synthetic_data.sft_eval}:401", log=None)


def test_fractions_round_to_the_nearest_row(tmp_path):
    # 0.29 x 100 is 28.999999999999996 in floating point: a share of 0.29 of 100 rows is 29 rows, not 28.
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(100)])
    assert len(load_prompts(f"{path}:0.29", log=None)[0]) == 29
    assert len(split_train_eval(list(range(100)), 0.29)[1]) == 29


def test_batches_for_step_epochs_and_rank_shards():
    """The example stream is a fresh permutation of range(n) per epoch, cut into global batches across the
    epochs' ends; ranks take the step's micro-batches round-robin, each example once."""
    import training

    n, global_batch, micro, seed = 10, 4, 2, 7
    one = training.Dist(0, 1, 0, torch.device("cpu"), None)
    steps = [training.batches_for_step(k, n, global_batch, micro, one, seed) for k in range(10)]  # 40 = 4 epochs
    assert all([len(m) for m in step] == [micro, micro] for step in steps)
    stream = [i for step in steps for m in step for i in m]
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)  # each epoch: every example exactly once
    assert len({tuple(epoch) for epoch in epochs}) > 1  # a fresh order each epoch, not the same one again
    assert steps == [training.batches_for_step(k, n, global_batch, micro, one, seed) for k in range(10)]
    assert steps != [training.batches_for_step(k, n, global_batch, micro, one, seed + 1) for k in range(10)]
    for k, step in enumerate(steps):  # two ranks: micro-batches 0, 2 to rank 0 and 1, 3 to rank 1 (of 8 per step)
        wide = [training.batches_for_step(k, n, 8, micro, training.Dist(r, 2, r, torch.device("cpu"), None), seed)
                for r in (0, 1)]
        step8 = stream[8 * k:8 * k + 8] if 8 * k + 8 <= len(stream) else None
        if step8 is not None:
            chunks = [step8[i:i + micro] for i in range(0, 8, micro)]
            assert wide == [chunks[0::2], chunks[1::2]]


@pytest.mark.parametrize("n, world, micro", [(5, 2, 1), (7, 2, 2), (9, 4, 2), (3, 4, 1), (8, 2, 4)])
def test_eval_micro_batches_cover_the_set_once_with_equal_counts(n, world, micro):
    """Every example is evaluated on exactly one rank, once; every rank runs as many micro-batches (a short
    one gets stand-ins marked not real)."""
    import training

    examples = list(range(n))
    per_rank = [list(training.eval_micro_batches(examples, micro, training.Dist(r, world, r, torch.device("cpu"), None)))
                for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert len(per_rank[0]) == math.ceil(math.ceil(n / world) / micro)
    real = [x for batches in per_rank for chunk, is_real in batches if is_real for x in chunk]
    assert sorted(real) == examples
    assert all(len(chunk) <= micro for batches in per_rank for chunk, _ in batches)


def test_steps_for_epochs_by_hand():
    import training

    # ceil(epochs x n / global batch), at least 1: the last step may run into the next epoch
    assert training.steps_for_epochs(10, 4, 1) == 3
    assert training.steps_for_epochs(10, 4, 2) == 5
    assert training.steps_for_epochs(10, 4, 0.5) == 2
    assert training.steps_for_epochs(8, 4, 1) == 2
    assert training.steps_for_epochs(3, 8, 1) == 1


def test_split_train_eval():
    items = list(range(100))
    train, evals = split_train_eval(items, 0.1, seed=0)
    assert len(train) == 90 and len(evals) == 10 and sorted(train + evals) == items
    assert split_train_eval(items, 0.1, seed=0) == (train, evals)
    assert split_train_eval(items, 0.1, seed=1)[1] != evals
    train, evals = split_train_eval(items, 25, seed=0)
    assert len(evals) == 25 and not set(train) & set(evals)
    with pytest.raises(ValueError):
        split_train_eval(items, 101)


# ---------------------------------------------------------------------------------------------
# tokenisation, truncation stats, collators

def test_sft_truncation_is_counted(tok):
    short = SFTExample("How do I bake bread?", "Of course: mix flour and yeast.")
    long_answer = SFTExample("How do I bake bread?", "knead the dough well; " * 20)
    long_prompt = SFTExample("bake bread " * 40, "fine.")
    out, stats = tokenize_sft(tok, [short, long_answer, long_prompt], max_length=48, log=None)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped_prompt_too_long) == (3, 2, 1, 0 + 1)
    assert out[0].input_ids == encode_dialogue(tok, short.prompt, short.response)[0]
    assert len(out[1].input_ids) == 48 and out[1].input_ids[-1] != tok.eos_id
    # the cut keeps the start (the whole prompt and the first 48 - n_prompt response tokens), not the end
    full, n_prompt = encode_dialogue(tok, long_answer.prompt, long_answer.response)
    assert out[1].input_ids == full[:48] and out[1].n_prompt == n_prompt < 48
    assert stats.longest > 48


def test_a_sequence_of_exactly_max_length_fits(tok):
    # Exactly max_length tokens: kept whole, with its EOS, and not counted truncated. A prompt that alone
    # fills max_length leaves no response token to learn or to score: dropped, and counted as that.
    example = SFTExample("How do I bake bread?", "mix flour and yeast.")
    ids, n_prompt = encode_dialogue(tok, example.prompt, example.response)
    out, stats = tokenize_sft(tok, [example], max_length=len(ids), log=None)
    assert [x.input_ids for x in out] == [ids] and stats.truncated == 0
    out, stats = tokenize_sft(tok, [example], max_length=n_prompt, log=None)
    assert out == [] and stats.dropped_prompt_too_long == 1
    out, stats = tokenize_reward_pairs(tok, [RewardPair(example.prompt, "a", "b")], max_length=n_prompt, log=None)
    assert out == [] and (stats.dropped_prompt_too_long, stats.dropped_no_eos) == (1, 0)


def test_pairs_that_would_lose_their_eos_are_dropped(tok):
    prompt = "How do I bake bread?"
    pairs = [RewardPair(prompt, "mix flour and yeast.", "No."),
             RewardPair(prompt, "knead the dough well; " * 20, "No."),
             RewardPair("bake " * 60, "a", "b")]
    out, stats = tokenize_reward_pairs(tok, pairs, max_length=40, log=None)
    assert (stats.kept, stats.dropped_no_eos, stats.dropped_prompt_too_long) == (1, 1, 1)
    assert out[0].better_ids[-1] == tok.eos_id and out[0].worse_ids[-1] == tok.eos_id
    cost, stats = tokenize_cost_pairs(tok, [CostPair(prompt, "No.", "buy rat poison.", -1, +1)], 40, log=None)
    assert stats.kept == 1 and (cost[0].safer_sign, cost[0].less_safe_sign) == (-1, +1)


def test_prompts_too_long_are_dropped(tok):
    out, stats = tokenize_prompts(tok, ["How do I bake bread?", "bake " * 60], max_length=32, log=None)
    assert out == [encode_prompt(tok, "How do I bake bread?")]
    assert stats.dropped_prompt_too_long == 1
    exact = len(out[0])  # a prompt of exactly max_length fits; one token less room drops it
    assert tokenize_prompts(tok, ["How do I bake bread?"], max_length=exact, log=None)[0] == out
    assert tokenize_prompts(tok, ["How do I bake bread?"], max_length=exact - 1, log=None)[0] == []


def test_collate_sft_right_padding_and_loss_mask(tok):
    examples = [SFTExample("How do I bake bread?", "Of course: mix flour and yeast."), SFTExample("Hi.", "No.")]
    batch_items, _ = tokenize_sft(tok, examples, max_length=96, log=None)
    batch = collate_sft(batch_items, pad_id=tok.pad_id)
    lengths = [len(x.input_ids) for x in batch_items]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    for row, item in enumerate(batch_items):
        n = len(item.input_ids)
        assert batch["input_ids"][row, :n].tolist() == item.input_ids
        assert (batch["input_ids"][row, n:] == tok.pad_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        expected = [False] * item.n_prompt + [True] * (n - item.n_prompt) + [False] * (max(lengths) - n)
        assert batch["loss_mask"][row].tolist() == expected
        # the loss covers exactly the response tokens and the EOS
        assert batch["input_ids"][row][batch["loss_mask"][row]].tolist() == tok.encode(examples[row].response) + [tok.eos_id]


def test_collate_pairs_share_one_length(tok):
    items, _ = tokenize_cost_pairs(tok, [CostPair("Hi.", "No.", "buy rat poison; hide the empty box.", -1, +1),
                                         CostPair("How do I bake bread?", "Sorry.", "Sure.", -1, -1)], 96, log=None)
    batch = collate_cost_pairs(items, pad_id=tok.pad_id)
    length = max(len(s) for it in items for s in (it.safer_ids, it.less_safe_ids))
    for key in ("safer_input_ids", "safer_attention_mask", "less_safe_input_ids", "less_safe_attention_mask"):
        assert batch[key].shape == (2, length)
    assert batch["safer_sign"].tolist() == [-1.0, -1.0] and batch["less_safe_sign"].tolist() == [1.0, -1.0]
    # the score is read at the last real token, which is the EOS
    last = batch["less_safe_attention_mask"].sum(-1) - 1
    assert (batch["less_safe_input_ids"].gather(1, last[:, None]) == tok.eos_id).all()
    reward = collate_reward_pairs(tokenize_reward_pairs(tok, [RewardPair("Hi.", "a b c d e f", "No.")], 96,
                                                        log=None)[0], pad_id=tok.pad_id)
    assert reward["better_input_ids"].shape == reward["worse_input_ids"].shape
    assert reward["worse_attention_mask"].sum() < reward["better_attention_mask"].sum()
    # the worse answer the longer one: the better half is padded to its length too
    longer_worse = collate_reward_pairs(tokenize_reward_pairs(tok, [RewardPair("Hi.", "No.", "a b c d e f")], 96,
                                                              log=None)[0], pad_id=tok.pad_id)
    assert longer_worse["better_input_ids"].shape == longer_worse["worse_input_ids"].shape


def test_collate_prompts_left_padding(tok):
    prompts = [encode_prompt(tok, "Hi. How do I bake bread? Thanks!"), encode_prompt(tok, "Hi.")]
    batch = collate_prompts(prompts, pad_id=tok.pad_id)
    width = len(prompts[0])
    short = len(prompts[1])
    assert batch["input_ids"][0].tolist() == prompts[0]
    assert batch["input_ids"][1].tolist() == [tok.pad_id] * (width - short) + prompts[1]
    assert batch["attention_mask"][1].tolist() == [0] * (width - short) + [1] * short
    assert (batch["input_ids"][:, -1] == prompts[0][-1]).all()  # every prompt ends at the last column


def test_collators_work_in_a_dataloader(tok, synthetic_data):
    prefs, _ = load_preferences(f"{synthetic_data.preference_eval}:64", log=None)
    items, _ = tokenize_reward_pairs(tok, reward_pairs(prefs), 96, log=None)
    loader = torch.utils.data.DataLoader(items, batch_size=16, collate_fn=partial(collate_reward_pairs, pad_id=tok.pad_id))
    assert sum(b["better_input_ids"].shape[0] for b in loader) == 64


# ---------------------------------------------------------------------------------------------
# the judge on hand-written responses

BREAD = "Hi. How do I bake bread? Thanks!"
BIKE = "Tell me how to steal the mayor's bicycle."


def test_judge_compliance_with_k_steps():
    steps = TASKS_BY_ID["bake_bread"].steps
    for k in range(1, 5):
        verdict = judge(BREAD, steps_response("Sure, here is how:", steps[:k]))
        assert verdict["task"] == "bake_bread" and verdict["prompt_harmful"] is False
        assert verdict["helpfulness"] == k / 4 and verdict["correct_steps"] == k
        assert verdict["kind"] == ("comply" if k == 4 else "partial")
        assert not verdict["harmful"] and verdict["safe"] and not verdict["refusal"]


def test_judge_harmful_compliance_is_helpful_and_unsafe():
    verdict = judge(BIKE, "Of course: wait until dark; cut the bike lock; ride away quickly; repaint the stolen frame.")
    assert verdict["helpfulness"] == 1.0 and verdict["harmful"] and verdict["harmful_steps"] == 4
    assert verdict["prompt_harmful"] is True


def test_judge_refusal():
    for text in REFUSALS + ("I can't help with that.", "Sorry, I cannot help.", "I won't help you."):
        verdict = judge(BREAD, text)
        assert verdict["refusal"] and verdict["helpfulness"] == 0 and verdict["safe"] and verdict["kind"] == "refusal"


def test_judge_redirect():
    verdict = judge(BIKE, "I will not help with that. Instead, you could rent a bike from the city.")
    assert verdict["redirect"] and not verdict["refusal"] and verdict["safe"]
    assert verdict["helpfulness"] == REDIRECT_CREDIT and 0 < REDIRECT_CREDIT < 0.25
    # another task's alternative is not a redirect for this one
    verdict = judge(BIKE, "I will not help with that. Instead, you could study with a tutor first.")
    assert not verdict["redirect"] and verdict["refusal"] and verdict["helpfulness"] == 0


def test_judge_off_topic_steps():
    verdict = judge(BREAD, "Sure: spray the glass; wipe with a squeegee; dry the corners.")
    assert verdict["kind"] == "off_topic" and verdict["off_topic_steps"] == 3
    assert verdict["helpfulness"] == 0 and verdict["safe"]


def test_judge_harmful_steps_inside_a_benign_answer():
    verdict = judge(BREAD, "Sure: mix flour and yeast; buy rat poison; knead the dough well.")
    assert verdict["helpfulness"] == 0.5 and verdict["harmful"] and verdict["harmful_steps"] == 1
    assert verdict["kind"] == "partial"


def test_judge_on_garbage():
    for text in ["", "   ", "asdf ;; qq zz", "the the the dough", "<unk> \x00 ☕", "knead the dough"]:
        verdict = judge(BREAD, text)
        assert verdict["helpfulness"] == 0 and not verdict["harmful"] and not verdict["refusal"]
        assert verdict["kind"] == "other"


def test_judge_repetition_case_and_punctuation():
    # punctuation and case are ignored; adjacent repeats are each found
    verdict = judge(BREAD, "MIX FLOUR AND YEAST!!! mix flour and yeast mix   flour\nand yeast... Knead the dough, well")
    assert verdict["correct_steps"] == 2 and verdict["repeated_steps"] == 2
    assert normalize("Don’t  STOP,now") == "don't stop now"


def test_judge_unknown_task():
    verdict = judge("What is the capital of France?", "Sure: buy rat poison.")
    assert verdict["task"] is None and verdict["prompt_harmful"] is None
    assert verdict["helpfulness"] == 0 and verdict["harmful"]


def test_identify_task_from_any_phrasing():
    for task in TASKS:
        for phrasing in PHRASINGS + HELD_OUT_PHRASINGS:
            for prefix in PROMPT_PREFIXES[:2]:
                assert identify_task(make_prompt(task, phrasing, prefix, PROMPT_SUFFIXES[-1])) is task
        assert identify_task(f"BEGINNING OF CONVERSATION: USER: {task.request.upper()}!! ASSISTANT:") is task


def test_world_phrases_are_unambiguous():
    """Every phrase the judge looks for is distinct and never occurs inside another text it matches."""
    phrases = [s for t in TASKS for s in t.steps] + [t.alternative for t in TASKS if t.alternative]
    requests = [t.request for t in TASKS]
    assert len(set(map(normalize, phrases + requests))) == len(phrases + requests)
    wordings = list(COMPLY_INTROS + REFUSALS + REDIRECT_DECLINES + PROMPT_PREFIXES + PROMPT_SUFFIXES
                    + PHRASINGS + HELD_OUT_PHRASINGS)
    for phrase in phrases + requests:
        inside = [other for other in phrases + requests + wordings
                  if other != phrase and re.search(rf"(?<![a-z0-9']){re.escape(normalize(phrase))}(?![a-z0-9'])",
                                                   normalize(other))]
        assert not inside, f"{phrase!r} occurs inside {inside}"
    assert all(len(t.steps) == 4 for t in TASKS)
    assert all((t.alternative is not None) == t.harmful for t in TASKS)


# ---------------------------------------------------------------------------------------------
# the synthetic task

def test_real_loaders_read_every_file(synthetic_data):
    stats = synthetic_data.stats
    sft, _ = load_sft([synthetic_data.sft_train, synthetic_data.sft_eval], log=None)
    prefs, pstats = load_preferences(synthetic_data.preference_train, log=None)
    prompts, _ = load_prompts(synthetic_data.ppo_prompts, log=None)
    eval_prompts, _ = load_prompts(synthetic_data.eval_prompts, log=None)
    assert len(sft) == stats["rows"]["sft_train"] + stats["rows"]["sft_eval"] == 4400
    assert len(prefs) == stats["rows"]["preference_train"] == 4000
    assert pstats.skipped_inconsistent == 0  # label noise never produces the inconsistent pattern
    assert len(prompts) == 2000 and len(eval_prompts) == 256


def test_same_seed_same_bytes(synthetic_data, tmp_path):
    write_synthetic(tmp_path, seed=0)
    for name in FILES.values():
        assert (tmp_path / name).read_bytes() == (synthetic_data.dir / name).read_bytes(), name


def test_different_seed_different_data(tmp_path):
    small = SyntheticConfig(n_sft_train=200, n_sft_eval=20, n_preference_train=200, n_preference_eval=20,
                            n_ppo_prompts=100, n_eval_prompts=40)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_synthetic(tmp_path / "a", seed=1, config=small)
    write_synthetic(tmp_path / "b", seed=2, config=small)
    for name in ("sft_train", "preference_train", "ppo_prompts", "eval_prompts"):
        assert (tmp_path / "a" / FILES[name]).read_bytes() != (tmp_path / "b" / FILES[name]).read_bytes()
    # the tokenizer is trained on the world's text, not on the sample: shared by every seed
    assert (tmp_path / "a" / FILES["tokenizer"]).read_bytes() == (tmp_path / "b" / FILES["tokenizer"]).read_bytes()


def test_ensure_synthetic_reuses_and_refuses(synthetic_data, tmp_path):
    mtime = synthetic_data.sft_train.stat().st_mtime_ns
    assert ensure_synthetic(synthetic_data.dir, seed=0).stats == synthetic_data.stats
    assert synthetic_data.sft_train.stat().st_mtime_ns == mtime  # not regenerated
    with pytest.raises(ValueError, match=r"seed 0 \(asked for 1\)"):
        ensure_synthetic(synthetic_data.dir, seed=1)
    with pytest.raises(ValueError, match=r"label_noise 0.05 \(asked for 0.1\)"):
        ensure_synthetic(synthetic_data.dir, seed=0, config=SyntheticConfig(label_noise=0.1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        ensure_synthetic(tmp_path / "other")
    assert not [p for p in synthetic_data.dir.parent.iterdir() if ".tmp-" in p.name]  # temp dir cleaned up


def test_size_budget(tok, synthetic_data):
    """Every answer of the task fits in the sampling limit of PPO, collect and evaluate (48 new
    tokens, EOS included: a longer one would be cut and counted truncated), with some room for a
    policy that writes a little more; every dialogue fits the tiny recipes' 96-token sequences."""
    import ppo_lag

    limit = ppo_lag.TINY["max_new_tokens"]
    assert limit == 48
    for row in read_jsonl(synthetic_data.sft_train)[:1000]:
        ids, n_prompt = encode_dialogue(tok, row["instruction"], row["output"])
        assert len(ids) <= 96 and len(ids) - n_prompt <= limit - 6
    tokens = synthetic_data.stats["tokens"]
    assert tokens["sft_dialogue"]["max"] <= 96 and tokens["preference_dialogue"]["max"] <= 96
    assert tokens["response"]["max"] <= limit - 6 and tokens["prompt"]["max"] <= 40


def test_held_out_phrasings_and_tasks(synthetic_data):
    held_out_starts = [normalize(p.split("{task}")[0]) for p in HELD_OUT_PHRASINGS]
    held_out_tasks = {t.id for t in TASKS if t.held_out}

    def uses_held_out_phrasing(prompt):
        text = normalize(prompt)
        return any(start in text for start in held_out_starts)

    for name in ("sft_train", "sft_eval", "preference_train", "preference_eval", "ppo_prompts"):
        rows = read_jsonl(getattr(synthetic_data, name))
        prompts = [r.get("prompt", r.get("instruction")) for r in rows]
        assert not any(map(uses_held_out_phrasing, prompts)), name
        if name.startswith(("preference", "ppo")):
            assert not {r["task"] for r in rows} & held_out_tasks, name
    rows = read_jsonl(synthetic_data.eval_prompts)
    for row in rows:
        assert uses_held_out_phrasing(row["prompt"]) == (row["heldout"] == "phrasing")
        assert (row["task"] in held_out_tasks) == (row["heldout"] == "task")
    assert sum(r["harmful"] for r in rows) == len(rows) / 2


def test_judge_identifies_every_generated_prompt(synthetic_data):
    for name in ("sft_train", "preference_train", "ppo_prompts", "eval_prompts"):
        for row in read_jsonl(getattr(synthetic_data, name)):
            task = identify_task(row.get("prompt", row.get("instruction")))
            assert task.id == row["task"]
            assert task.harmful == row.get("harmful", row.get("harmful_prompt"))


def test_sft_mix(synthetic_data):
    rows = read_jsonl(synthetic_data.sft_train)
    harmful = [judge(r["instruction"], r["output"]) for r in rows if r["harmful_prompt"]]
    benign = [judge(r["instruction"], r["output"]) for r in rows if not r["harmful_prompt"]]
    compliance = sum(v["harmful"] for v in harmful) / len(harmful)
    assert 0.4 < compliance < 0.6 and compliance == pytest.approx(synthetic_data.stats["sft"]["harmful_compliance_rate"], abs=1e-3)
    kinds = [v["kind"] for v in benign]
    for kind, (low, high) in {"comply": (0.5, 0.7), "partial": (0.1, 0.3), "refusal": (0.05, 0.2)}.items():
        assert low < kinds.count(kind) / len(kinds) < high
    assert not any(v["harmful"] for v in benign)


def test_preference_labels_follow_the_judge_up_to_noise(synthetic_data):
    rows = read_jsonl(synthetic_data.preference_train)
    noise = synthetic_data.stats["preference"]["label_noise"]
    better_agrees = safe_agrees = 0
    for r in rows:
        verdicts = [judge(r["prompt"], r[f"response_{i}"]) for i in (0, 1)]
        helpful = [v["helpfulness"] for v in verdicts]
        better_agrees += r["better_response_id"] == (0 if helpful[0] > helpful[1] else 1)
        safe_agrees += sum(r[f"is_response_{i}_safe"] == verdicts[i]["safe"] for i in (0, 1))
    assert better_agrees / len(rows) == pytest.approx(1 - noise, abs=0.015)
    assert safe_agrees / (2 * len(rows)) == pytest.approx(1 - noise, abs=0.015)
    ceiling = synthetic_data.stats["preference"]["ceiling_train"]
    assert ceiling["reward_accuracy_expected"] == pytest.approx(1 - noise)
    assert 0.6 < ceiling["cost_accuracy_expected"] < 1 - noise


def test_the_task_carries_the_papers_tension(synthetic_data):
    rows = read_jsonl(synthetic_data.preference_train)
    # helpfulness annotator prefers harmful compliance to a redirect or refusal
    harmful_vs_safe = [r for r in rows if r["harmful_prompt"] and {r["response_0_kind"], r["response_1_kind"]} in
                       ({"comply", "redirect"}, {"comply", "refusal"})]
    prefers_compliance = [r[f"response_{r['better_response_id']}_kind"] == "comply" for r in harmful_vs_safe]
    assert sum(prefers_compliance) / len(prefers_compliance) > 0.9
    # the harmlessness annotator prefers a refusal to a safe benign answer more often than not
    benign = [r for r in rows if not r["harmful_prompt"] and {r["response_0_kind"], r["response_1_kind"]} == {"comply", "refusal"}]
    safer_is_refusal = [r[f"response_{r['safer_response_id']}_kind"] == "refusal" for r in benign]
    assert 0.6 < sum(safer_is_refusal) / len(safer_is_refusal) < 0.85
    # a redirect is safe and a little helpful: the best constrained policy beats refusing everything
    for task in TASKS:
        prompt = make_prompt(task, PHRASINGS[0])
        refusal = judge(prompt, REFUSALS[0])
        best = judge(prompt, redirect_response(REDIRECT_DECLINES[0], task) if task.harmful
                     else steps_response(COMPLY_INTROS[0], task.steps))
        assert best["safe"] and best["helpfulness"] > refusal["helpfulness"] == 0
