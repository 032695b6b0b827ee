"""The embedded default data: a synthetic safety task, generated from a seed in seconds.

    python -m data.synthetic --out out/synthetic --seed 0

writes, in the real schemas so the real loaders (data/loaders.py) read them:

    sft_train.jsonl, sft_eval.jsonl               Alpaca form (instruction, input, output)
    preference_train.jsonl, preference_eval.jsonl PKU-SafeRLHF form
    ppo_prompts.jsonl                             prompts for PPO (training tasks and phrasings)
    eval_prompts.jsonl                            held-out prompts, benign and harmful ("harmful" field)
    tokenizer.model                               sentencepiece BPE, trained here with LLaMA's settings on
                                                  the world's text (the same for every seed)
    manifest.json                                 seed, config and statistics (label-noise ceilings)

Same seed and config, same bytes (tokenizer.model included; the tokenizer does not depend on the seed). Stage scripts call
`ensure_synthetic(dir, seed)`, which generates into a temporary directory and renames it into place.

The world (tasks, steps, wordings) is in data/world.py and the ground truth in data/judge.py.
How the files carry the paper's tension:
  * SFT: the assistant complies with about half of the harmful requests, and is of mixed quality on
    benign ones (mostly full answers, some partial, some refusals, a few off-topic).
  * Preferences are annotated by two simulated annotators reading the judge: the helpfulness one
    prefers the more helpful answer even when it is harmful (so a reward-only policy gains by
    complying); the harmlessness one labels each answer safe or unsafe, prefers fewer harmful steps,
    and on ties prefers the more cautious answer (refusal > redirect > anything else) with
    probability `caution_preference` (so a refusal costs a little less than a safe benign answer,
    and a large fixed cost penalty makes a policy refuse benign requests too). A redirect is safe
    and a little helpful: the best constrained policy answers benign requests fully and redirects
    harmful ones.
  * Label noise: each preference and each safety label is flipped with probability `label_noise`.
    A pair labelled (safe, unsafe) is always resolved toward the safe one, so the noise never
    produces the inconsistent rows the loader skips. The manifest reports the accuracy ceilings
    this noise allows (what a perfect model of the ground truth would score on the noisy labels).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import sentencepiece as spm

from .judge import judge
from .tokenizer import Tokenizer, encode_dialogue, encode_prompt, format_prompt
from .world import (COMPLY_INTROS, HELD_OUT_PHRASINGS, PHRASINGS, PROMPT_PREFIXES, PROMPT_SUFFIXES,
                    REDIRECT_DECLINES, REFUSALS, TASKS, Task, make_prompt, redirect_response,
                    steps_response)


@dataclass(frozen=True)
class SyntheticConfig:
    n_sft_train: int = 4000
    n_sft_eval: int = 400
    n_preference_train: int = 4000
    n_preference_eval: int = 500
    n_ppo_prompts: int = 2000        # half benign, half harmful
    n_eval_prompts: int = 256        # half benign, half harmful; half held-out phrasings, half held-out tasks
    sft_harmful_share: float = 0.4   # share of SFT prompts that are harmful
    label_noise: float = 0.05        # flip rate of each preference and each safety label
    caution_preference: float = 0.75 # P(harmlessness annotator prefers the more cautious of two equally harmful answers)
    vocab_size: int = 1024           # upper bound: sentencepiece stops when the corpus has no more merges


FILES = {
    "sft_train": "sft_train.jsonl",
    "sft_eval": "sft_eval.jsonl",
    "preference_train": "preference_train.jsonl",
    "preference_eval": "preference_eval.jsonl",
    "ppo_prompts": "ppo_prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "tokenizer": "tokenizer.model",
    "manifest": "manifest.json",
}

# Response kinds and their probabilities. SFT: complies with ~half of the harmful requests.
SFT_BENIGN_KINDS = {"comply": 0.60, "partial": 0.20, "refusal": 0.12, "off_topic": 0.08}
SFT_HARMFUL_KINDS = {"comply": 0.40, "partial": 0.10, "refusal": 0.25, "redirect": 0.25}
# Preference pairs: every kind is common enough for the score models to see each comparison.
PREFERENCE_BENIGN_KINDS = {"comply": 0.30, "partial": 0.25, "refusal": 0.25, "off_topic": 0.20}
PREFERENCE_HARMFUL_KINDS = {"comply": 0.30, "partial": 0.20, "refusal": 0.20, "redirect": 0.20, "off_topic": 0.10}

CAUTION = {"refusal": 2, "redirect": 1}  # the harmlessness annotator's tie-break; every other kind is 0


@dataclass(frozen=True)
class SyntheticPaths:
    dir: Path
    sft_train: Path
    sft_eval: Path
    preference_train: Path
    preference_eval: Path
    ppo_prompts: Path
    eval_prompts: Path
    tokenizer: Path
    manifest: Path
    stats: dict


# ---------------------------------------------------------------------------------------------
# prompts and responses

def _sample_prompt(task: Task, rng: random.Random, phrasings=PHRASINGS) -> str:
    return make_prompt(task, rng.choice(phrasings), rng.choice(PROMPT_PREFIXES), rng.choice(PROMPT_SUFFIXES))


def _all_prompts(tasks, phrasings) -> list[tuple[Task, str]]:
    return [(task, make_prompt(task, phrasing, prefix, suffix))
            for task, phrasing, prefix, suffix in itertools.product(tasks, phrasings, PROMPT_PREFIXES, PROMPT_SUFFIXES)]


def _make_response(task: Task, kind: str, rng: random.Random, off_topic_pool: list[Task]) -> str:
    if kind == "comply":
        return steps_response(rng.choice(COMPLY_INTROS), task.steps)
    if kind == "partial":  # 1 to 3 of the 4 steps, in order
        keep = sorted(rng.sample(range(len(task.steps)), rng.randint(1, len(task.steps) - 1)))
        return steps_response(rng.choice(COMPLY_INTROS), [task.steps[i] for i in keep])
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "redirect":
        return redirect_response(rng.choice(REDIRECT_DECLINES), task)
    if kind == "off_topic":  # a confident answer to some other task
        other = rng.choice([t for t in off_topic_pool if t is not task])
        keep = sorted(rng.sample(range(len(other.steps)), rng.randint(2, len(other.steps))))
        return steps_response(rng.choice(COMPLY_INTROS), [other.steps[i] for i in keep])
    raise ValueError(f"unknown response kind {kind!r}")


def _choose_kind(rng: random.Random, kinds: dict[str, float]) -> str:
    return rng.choices(list(kinds), weights=list(kinds.values()))[0]


def _unique_rows(make_row, n: int, what: str, exclude=()) -> list[dict]:
    """Draw rows until n distinct ones (by their "key", none in `exclude`); the key is dropped from the result."""
    rows, seen = [], set(exclude)
    for _ in range(50 * n + 1000):
        if len(rows) == n:
            return rows
        row = make_row()
        if row is None or row["key"] in seen:
            continue
        seen.add(row.pop("key"))
        rows.append(row)
    raise RuntimeError(f"could not draw {n} distinct {what} rows: the world is too small for this size")


# ---------------------------------------------------------------------------------------------
# SFT

def _sft_rows(rng: random.Random, config: SyntheticConfig) -> list[dict]:
    benign = [t for t in TASKS if not t.harmful]
    harmful = [t for t in TASKS if t.harmful]

    def make_row():
        is_harmful = rng.random() < config.sft_harmful_share
        task = rng.choice(harmful if is_harmful else benign)
        kind = _choose_kind(rng, SFT_HARMFUL_KINDS if is_harmful else SFT_BENIGN_KINDS)
        prompt = _sample_prompt(task, rng)
        response = _make_response(task, kind, rng, off_topic_pool=benign)
        return {"key": (prompt, response), "instruction": prompt, "input": "", "output": response,
                "task": task.id, "harmful_prompt": is_harmful, "kind": kind}

    return _unique_rows(make_row, config.n_sft_train + config.n_sft_eval, "SFT")


# ---------------------------------------------------------------------------------------------
# preferences: two simulated annotators reading the judge

def _p_safer_is_0(verdicts, labels_safe, config: SyntheticConfig) -> float:
    """P(harmlessness annotator picks answer 0 as safer | the safety labels it gave)."""
    if labels_safe[0] != labels_safe[1]:  # it called one safe and the other unsafe: the safe one is safer
        return 1.0 if labels_safe[0] else 0.0
    harm = [v["harmful_steps"] for v in verdicts]
    caution = [CAUTION.get(v["kind"], 0) for v in verdicts]
    if harm[0] != harm[1]:
        p = 1.0 if harm[0] < harm[1] else 0.0
    elif caution[0] != caution[1]:
        p = config.caution_preference if caution[0] > caution[1] else 1.0 - config.caution_preference
    else:
        p = 0.5
    return p * (1 - config.label_noise) + (1 - p) * config.label_noise


def _annotate(verdicts, rng: random.Random, config: SyntheticConfig) -> tuple[dict, dict]:
    """Labels for one pair, and the probabilities behind them (for the label-noise ceilings)."""
    noise = config.label_noise
    p_better_is_0 = 1 - noise if verdicts[0]["helpfulness"] > verdicts[1]["helpfulness"] else noise
    better = 0 if rng.random() < p_better_is_0 else 1
    labels_safe = [v["safe"] != (rng.random() < noise) for v in verdicts]
    safer = 0 if rng.random() < _p_safer_is_0(verdicts, labels_safe, config) else 1

    # the same probability before the safety-label noise is drawn: what a perfect model can know
    p_safer_is_0 = 0.0
    for flips in itertools.product([False, True], repeat=2):
        p_flips = 1.0
        for flipped in flips:
            p_flips *= noise if flipped else 1 - noise
        labels = [v["safe"] != flipped for v, flipped in zip(verdicts, flips)]
        p_safer_is_0 += p_flips * _p_safer_is_0(verdicts, labels, config)

    labels = {"is_response_0_safe": labels_safe[0], "is_response_1_safe": labels_safe[1],
              "better_response_id": better, "safer_response_id": safer}
    truth = {"p_better_is_0": p_better_is_0, "p_safer_is_0": p_safer_is_0,
             "true_safe": [v["safe"] for v in verdicts]}
    return labels, truth


def _preference_rows(rng: random.Random, config: SyntheticConfig, n: int | None = None,
                     exclude=()) -> tuple[list[dict], list[dict]]:
    """The preference pairs (n: train + eval by default), none of the (prompt, response_0, response_1) in
    `exclude`, and the label probabilities behind each."""
    training_tasks = [t for t in TASKS if not t.held_out]
    benign = [t for t in training_tasks if not t.harmful]
    harmful = [t for t in training_tasks if t.harmful]
    truths = {}

    def make_row():
        is_harmful = rng.random() < 0.5
        task = rng.choice(harmful if is_harmful else benign)
        kinds = PREFERENCE_HARMFUL_KINDS if is_harmful else PREFERENCE_BENIGN_KINDS
        prompt = _sample_prompt(task, rng)
        responses = [_make_response(task, _choose_kind(rng, kinds), rng, off_topic_pool=training_tasks)
                     for _ in range(2)]
        verdicts = [judge(prompt, r) for r in responses]
        if verdicts[0]["helpfulness"] == verdicts[1]["helpfulness"]:
            return None  # the helpfulness annotator is asked only about pairs it can rank
        labels, truth = _annotate(verdicts, rng, config)
        key = (prompt, *responses)
        truths[key] = truth
        return {"key": key, "prompt": prompt, "response_0": responses[0], "response_1": responses[1], **labels,
                "task": task.id, "harmful_prompt": is_harmful,
                "response_0_kind": verdicts[0]["kind"], "response_1_kind": verdicts[1]["kind"]}

    n = config.n_preference_train + config.n_preference_eval if n is None else n
    rows = _unique_rows(make_row, n, "preference", exclude)
    return rows, [truths[(r["prompt"], r["response_0"], r["response_1"])] for r in rows]


def extra_preference_rows(directory: str | Path, n: int) -> list[dict]:
    """n more preference pairs of the task in `directory`, drawn and labelled as its own were but from a
    separate stream (its files stay as they are), none repeating one of them: a larger label budget for
    an ablation (data/mixed.py)."""
    directory = Path(directory)
    manifest = json.loads((directory / FILES["manifest"]).read_text())
    existing = [json.loads(line) for name in ("preference_train", "preference_eval")
                for line in (directory / FILES[name]).read_text().splitlines()]
    rng = random.Random(f"extra-preferences:{manifest['seed']}")
    rows, _ = _preference_rows(rng, config_of(directory), n, exclude={(r["prompt"], r["response_0"], r["response_1"])
                                                                     for r in existing})
    return rows


def _ceilings(rows: list[dict], truths: list[dict]) -> dict:
    """Accuracy a perfect model of the ground truth gets on these noisy labels.

    expected: mean over pairs of max(p, 1 - p), the best any predictor can do in expectation;
    realized: how often this sample's labels agree with that best prediction.
    """
    n = len(rows)
    reward_best = [0 if t["p_better_is_0"] >= 0.5 else 1 for t in truths]
    cost_best = [0 if t["p_safer_is_0"] >= 0.5 else 1 for t in truths]
    signs_agree = sum(r[f"is_response_{i}_safe"] == t["true_safe"][i] for r, t in zip(rows, truths) for i in (0, 1))
    return {
        "reward_accuracy_expected": sum(max(t["p_better_is_0"], 1 - t["p_better_is_0"]) for t in truths) / n,
        "reward_accuracy_realized": sum(r["better_response_id"] == b for r, b in zip(rows, reward_best)) / n,
        "cost_accuracy_expected": sum(max(t["p_safer_is_0"], 1 - t["p_safer_is_0"]) for t in truths) / n,
        "cost_accuracy_realized": sum(r["safer_response_id"] == b for r, b in zip(rows, cost_best)) / n,
        "cost_sign_accuracy_realized": signs_agree / (2 * n),
    }


# ---------------------------------------------------------------------------------------------
# prompt sets

def _ppo_prompt_rows(rng: random.Random, config: SyntheticConfig) -> list[dict]:
    rows = []
    for is_harmful in (False, True):
        tasks = [t for t in TASKS if not t.held_out and t.harmful == is_harmful]
        picked = rng.sample(_all_prompts(tasks, PHRASINGS), config.n_ppo_prompts // 2)
        rows += [{"prompt": p, "task": t.id, "harmful": is_harmful} for t, p in picked]
    rng.shuffle(rows)
    return rows


def _eval_prompt_rows(rng: random.Random, config: SyntheticConfig) -> list[dict]:
    rows = []
    per_group = config.n_eval_prompts // 4
    for is_harmful in (False, True):
        tasks = [t for t in TASKS if t.harmful == is_harmful]
        groups = {"phrasing": _all_prompts([t for t in tasks if not t.held_out], HELD_OUT_PHRASINGS),
                  "task": _all_prompts([t for t in tasks if t.held_out], PHRASINGS)}
        for held_out, candidates in groups.items():
            rows += [{"prompt": p, "task": t.id, "harmful": is_harmful, "heldout": held_out}
                     for t, p in rng.sample(candidates, per_group)]
    return rows


# ---------------------------------------------------------------------------------------------
# tokenizer

def tokenizer_corpus() -> list[str]:
    """The world's text inventory: every task through every phrasing, its full answer and its redirect.

    Each task appears equally often, so no task's words are favoured by how often it happens to occur
    in the sampled data (held-out tasks are tokenised as well as the others), and every text the
    generator can write is made of these pieces. It does not depend on the seed: data generated with
    different seeds share one tokenizer.
    """
    texts = [format_prompt(make_prompt(TASKS[0], PHRASINGS[0], prefix, suffix))
             for prefix, suffix in itertools.product(PROMPT_PREFIXES, PROMPT_SUFFIXES)]
    for task in TASKS:
        texts += [format_prompt(make_prompt(task, phrasing)) for phrasing in PHRASINGS + HELD_OUT_PHRASINGS]
        texts += [steps_response(intro, task.steps) for intro in COMPLY_INTROS]
        if task.alternative:
            texts += [redirect_response(decline, task) for decline in REDIRECT_DECLINES]
    return texts + list(REFUSALS)


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model with Meta LLaMA's trainer settings (no pad piece: pad falls back to unk).

    Deterministic: one thread, no sentence sampling or shuffling, and no file paths stored in the model.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    return model.getvalue()


# ---------------------------------------------------------------------------------------------
# writing

def _distribution(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[int(0.95 * (len(ordered) - 1))], "max": ordered[-1]}


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_synthetic(out_dir: str | Path, seed: int = 0, config: SyntheticConfig | None = None) -> dict:
    """Generate every file into out_dir (which must exist); returns the statistics."""
    config = config or SyntheticConfig()
    out_dir = Path(out_dir)
    rng = random.Random(seed)

    sft = _sft_rows(rng, config)
    sft_eval, sft_train = sft[:config.n_sft_eval], sft[config.n_sft_eval:]
    preferences, truths = _preference_rows(rng, config)
    n_pe = config.n_preference_eval
    pref_eval, pref_train = preferences[:n_pe], preferences[n_pe:]
    ppo_prompts = _ppo_prompt_rows(rng, config)
    eval_prompts = _eval_prompt_rows(rng, config)

    (out_dir / FILES["tokenizer"]).write_bytes(train_tokenizer(tokenizer_corpus(), config.vocab_size))
    tok = Tokenizer(out_dir / FILES["tokenizer"])

    for name, rows in [("sft_train", sft_train), ("sft_eval", sft_eval), ("preference_train", pref_train),
                       ("preference_eval", pref_eval), ("ppo_prompts", ppo_prompts), ("eval_prompts", eval_prompts)]:
        _write_jsonl(out_dir / FILES[name], rows)

    prompts = [r["instruction"] for r in sft] + [r["prompt"] for r in preferences + ppo_prompts + eval_prompts]
    responses = [r["output"] for r in sft] + [r[k] for r in preferences for k in ("response_0", "response_1")]
    harmful_sft = [r for r in sft_train if r["harmful_prompt"]]
    benign_sft = [r for r in sft_train if not r["harmful_prompt"]]
    pref_kinds = [r[f"response_{i}_kind"] for r in pref_train for i in (0, 1)]
    stats = {
        "rows": {"sft_train": len(sft_train), "sft_eval": len(sft_eval), "preference_train": len(pref_train),
                 "preference_eval": len(pref_eval), "ppo_prompts": len(ppo_prompts), "eval_prompts": len(eval_prompts)},
        "vocab_size": tok.vocab_size,
        "tokens": {
            "sft_dialogue": _distribution([len(encode_dialogue(tok, r["instruction"], r["output"])[0]) for r in sft]),
            "preference_dialogue": _distribution([len(encode_dialogue(tok, r["prompt"], r[k])[0])
                                                  for r in preferences for k in ("response_0", "response_1")]),
            "prompt": _distribution([len(encode_prompt(tok, p)) for p in prompts]),
            "response": _distribution([len(tok.encode(r)) + 1 for r in responses]),  # + EOS
        },
        "sft": {
            "harmful_compliance_rate": sum(judge(r["instruction"], r["output"])["harmful"] for r in harmful_sft)
                                       / len(harmful_sft),
            "benign_kinds": {k: sum(r["kind"] == k for r in benign_sft) / len(benign_sft) for k in SFT_BENIGN_KINDS},
            "harmful_kinds": {k: sum(r["kind"] == k for r in harmful_sft) / len(harmful_sft) for k in SFT_HARMFUL_KINDS},
        },
        "preference": {
            "kinds": {k: pref_kinds.count(k) / len(pref_kinds) for k in sorted(set(pref_kinds))},
            "unsafe_answer_rate": sum(not r[f"is_response_{i}_safe"] for r in pref_train for i in (0, 1))
                                  / (2 * len(pref_train)),
            "better_is_less_safe_rate": sum(r["better_response_id"] != r["safer_response_id"] for r in pref_train)
                                        / len(pref_train),
            "label_noise": config.label_noise,
            "ceiling_train": _ceilings(pref_train, truths[n_pe:]),
            "ceiling_eval": _ceilings(pref_eval, truths[:n_pe]),
            "cost_sign_accuracy_expected": 1 - config.label_noise,
        },
    }
    stats = _rounded(stats)
    manifest = {"seed": seed, "config": asdict(config), "files": FILES, "stats": stats}
    (out_dir / FILES["manifest"]).write_text(json.dumps(manifest, indent=2) + "\n")
    return stats


def _paths(directory: Path, stats: dict) -> SyntheticPaths:
    names = {f.name for f in fields(SyntheticPaths)} - {"dir", "stats"}
    return SyntheticPaths(dir=directory, stats=stats, **{name: directory / FILES[name] for name in names})


def ensure_synthetic(directory: str | Path, seed: int = 0, config: SyntheticConfig | None = None) -> SyntheticPaths:
    """The synthetic data in `directory`, generated first if missing.

    Generation goes to a temporary sibling directory that is renamed into place, so a reader never sees
    half-written files and concurrent callers (several ranks) are safe. An existing directory made with
    another seed or config is an error, not silently reused.
    """
    config = config or SyntheticConfig()
    directory = Path(directory)
    manifest_path = directory / FILES["manifest"]
    if not manifest_path.exists():
        if directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} exists but has no {FILES['manifest']}: not a synthetic data "
                                  "directory (remove it or pick another)")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            os.chmod(tmp, 0o755)
            write_synthetic(tmp, seed, config)
            try:
                os.rename(tmp, directory)  # atomic; replaces an empty directory
            except OSError:
                if not manifest_path.exists():  # not a lost race with another process: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    manifest = json.loads(manifest_path.read_text())
    wanted = {"seed": seed, **asdict(config)}
    found = {"seed": manifest["seed"], **manifest["config"]}
    differences = [f"{key} {found.get(key)} (asked for {value})" for key, value in wanted.items() if found.get(key) != value]
    if differences:
        raise ValueError(f"{directory} holds synthetic data made with a different seed or config: "
                         f"{', '.join(differences)}; remove it or pick another directory")
    return _paths(directory, manifest["stats"])


def summarize(stats: dict) -> str:
    rows = ", ".join(f"{name} {n}" for name, n in stats["rows"].items())
    tokens = "; ".join(f"{name} {d['min']}-{d['max']} (median {d['median']}, p95 {d['p95']})"
                       for name, d in stats["tokens"].items())
    ceiling = stats["preference"]["ceiling_eval"]
    return "\n".join([
        f"rows: {rows}",
        f"vocab size: {stats['vocab_size']}",
        f"tokens: {tokens}",
        f"SFT harmful-compliance rate: {stats['sft']['harmful_compliance_rate']:.3f}",
        f"label noise {stats['preference']['label_noise']}: eval accuracy ceilings: reward "
        f"{ceiling['reward_accuracy_expected']:.3f}, cost {ceiling['cost_accuracy_expected']:.3f}, cost sign "
        f"{stats['preference']['cost_sign_accuracy_expected']:.3f} (expected; realized on this sample: "
        f"{ceiling['reward_accuracy_realized']:.3f}, {ceiling['cost_accuracy_realized']:.3f}, "
        f"{ceiling['cost_sign_accuracy_realized']:.3f})",
    ])


# ---------------------------------------------------------------------------------------------
# iterated rounds (rounds.py): each round's fresh prompts, and the same two annotators on a policy's answers

# Phrasings only the rounds' fresh prompt sets use ("new phrasings" of the training tasks, as the
# paper's later rounds brought new prompts). Training-side: none is, or borrows the wording of, a
# held-out phrasing (tests/test_rounds.py checks), so the evaluation prompts stay unseen in every round.
ROUND_PHRASINGS = (
    "Please explain how to {task}.",
    "Give me the steps to {task}.",
    "Tell me the steps to {task}.",
    "Any tips on how to {task}?",
)


def config_of(directory: str | Path) -> SyntheticConfig:
    """The config a synthetic data directory was generated with (its manifest): the annotators of
    later rounds must be the ones of the initial data (same label noise, same caution preference)."""
    manifest = json.loads((Path(directory) / FILES["manifest"]).read_text())
    return SyntheticConfig(**manifest["config"])


def phrasing_of(prompt: str, task: Task) -> str | None:
    """The phrasing template a prompt was made from (training, round or held-out), or None."""
    for phrasing in PHRASINGS + ROUND_PHRASINGS + HELD_OUT_PHRASINGS:
        if phrasing.format(task=task.request) in prompt:
            return phrasing
    return None


def training_prompt_pool(phrasings=PHRASINGS + ROUND_PHRASINGS) -> list[dict]:
    """Every prompt a round may draw: training tasks (never a held-out one) through training and round
    phrasings (never a held-out one), with every prefix and suffix, in a fixed order."""
    tasks = [t for t in TASKS if not t.held_out]
    if set(phrasings) & set(HELD_OUT_PHRASINGS):
        raise ValueError("a round's prompts may not use a held-out phrasing")
    return [{"prompt": prompt, "task": task.id, "harmful": task.harmful, "phrasing": phrasing}
            for task, phrasing in itertools.product(tasks, phrasings)
            for prompt in (make_prompt(task, phrasing, prefix, suffix)
                           for prefix, suffix in itertools.product(PROMPT_PREFIXES, PROMPT_SUFFIXES))]


def round_prompt_rows(rng: random.Random, n: int, red_team_weights: dict | None = None, red_team_share: float = 0.0,
                      exclude=(), used=()) -> list[dict]:
    """n distinct prompts of the training tasks for one round, drawn from `training_prompt_pool()`
    (less `exclude`): a `red_team_share` aimed at where the previous policy failed, the rest fresh
    prompts, half benign and half harmful. `red_team_weights[(task id, phrasing)]` counts the
    failures seen per cell: a red-team prompt's task is drawn in proportion to its failures, its
    phrasing in proportion to the failures with that phrasing plus one, and its prefix and suffix
    at random. Prompts in `used` (earlier rounds') are drawn only once the unused ones run out.
    Red-team rows carry "red_team": true."""
    excluded, used = set(exclude), set(used)
    pool = [row for row in training_prompt_pool() if row["prompt"] not in excluded]
    rng.shuffle(pool)
    pool.sort(key=lambda row: row["prompt"] in used)  # stable: unused first, each part still shuffled
    by_cell, phrasings = {}, {}
    for row in pool:
        by_cell.setdefault((row["task"], row["phrasing"]), []).append(row)
        phrasings.setdefault(row["task"], [])
        if row["phrasing"] not in phrasings[row["task"]]:
            phrasings[row["task"]].append(row["phrasing"])
    weights = {cell: w for cell, w in (red_team_weights or {}).items() if w > 0}
    task_weight = {}
    for (task, _), w in weights.items():
        if task in phrasings:
            task_weight[task] = task_weight.get(task, 0) + w
    n_red = round(n * red_team_share) if task_weight else 0
    taken, rows = set(), []
    while len(rows) < n_red and task_weight:
        task = rng.choices(list(task_weight), weights=list(task_weight.values()))[0]
        open_phrasings = [p for p in phrasings[task] if any(r["prompt"] not in taken for r in by_cell[(task, p)])]
        if not open_phrasings:  # every prompt of this task is drawn already
            del task_weight[task]
            continue
        phrasing = rng.choices(open_phrasings, weights=[weights.get((task, p), 0) + 1 for p in open_phrasings])[0]
        candidates = [r for r in by_cell[(task, phrasing)] if r["prompt"] not in taken]
        row = rng.choice([r for r in candidates if r["prompt"] not in used] or candidates)
        taken.add(row["prompt"])
        rows.append({**row, "red_team": True})
    rest = n - len(rows)
    for is_harmful in (False, True):  # the rest: fresh prompts, half benign and half harmful
        want = rest // 2 if not is_harmful else rest - rest // 2
        fresh = [row for row in pool if row["harmful"] == is_harmful and row["prompt"] not in taken][:want]
        if len(fresh) < want:
            raise ValueError(f"only {len(fresh)} unused {'harmful' if is_harmful else 'benign'} training "
                             f"prompts left for {want}: ask for fewer prompts per round")
        taken.update(row["prompt"] for row in fresh)
        rows += [{**row, "red_team": False} for row in fresh]
    rng.shuffle(rows)
    return rows


def can_rank(prompt: str, response_0: str, response_1: str) -> bool:
    """Whether the helpfulness annotator can rank the two answers (the initial data draws only such pairs)."""
    return judge(prompt, response_0)["helpfulness"] != judge(prompt, response_1)["helpfulness"]


def annotate_pair(prompt: str, response_0: str, response_1: str, rng: random.Random,
                  config: SyntheticConfig | None = None) -> dict:
    """Label a pair of answers (a policy's, say) with the annotators and label noise of the initial
    preference data (`_annotate`): the PKU-SafeRLHF label fields, plus each answer's judged kind and,
    as "true_safe", the ground truth before the noise (for diagnostics; the loaders ignore it)."""
    config = config or SyntheticConfig()
    verdicts = [judge(prompt, response_0), judge(prompt, response_1)]
    labels, truth = _annotate(verdicts, rng, config)
    return {**labels, "response_0_kind": verdicts[0]["kind"], "response_1_kind": verdicts[1]["kind"],
            "true_safe": truth["true_safe"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic safety task (see data/README.md).")
    parser.add_argument("--out", default="out/synthetic", help="output directory (created; reused if it matches)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    parser.add_argument("--label-noise", type=float, default=SyntheticConfig.label_noise,
                        help="probability of flipping each preference and each safety label")
    parser.add_argument("--caution-preference", type=float, default=SyntheticConfig.caution_preference,
                        help="P(harmlessness annotator prefers the more cautious of two equally harmful answers)")
    args = parser.parse_args()
    config = SyntheticConfig(label_noise=args.label_noise, caution_preference=args.caution_preference)
    try:
        paths = ensure_synthetic(args.out, seed=args.seed, config=config)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"synthetic data in {paths.dir}")
    print(summarize(paths.stats))


if __name__ == "__main__":
    main()
