"""A round's collect step: the last policy answers a fresh prompt set, and pairs of its answers are
exported for labelling (<round>/collect/: prompts.jsonl, answers.jsonl, pairs.jsonl, collect.json,
LABELLING.md).

The prompts: a probe of the last round's own training prompts shows where the last policy fails (the
source decides how: the judge, or the last cost model); a --red-team-share of the new prompts aims at
that, the rest are fresh. Held-out tasks and phrasings and the evaluation prompts are never drawn.
"""

from __future__ import annotations

import itertools
import json
import random
import time

from fileio import read_jsonl, write_jsonl
from iterated.label import LABEL_FIELDS, LABELLING_README


def collect(rounds, r: int):
    """Round r's collect step (`rounds`: rounds.py's Rounds: its layout, source and flags)."""
    import hf_io
    from data.loaders import load_prompts
    from data.tokenizer import Tokenizer
    from evaluate import sample_answers
    from training import resolve_template

    layout, source, args = rounds.layout, rounds.source, rounds.args
    out = layout.dir(r) / "collect"
    policy_path = layout.actor(r - 1)
    template = resolve_template(None, policy_path)
    tok = Tokenizer(policy_path).for_template(template)
    policy = hf_io.load_pretrained(policy_path, device=args.device).eval()
    rng = random.Random(args.seed * 1_000_003 + r)

    def sample(prompts, seed):
        texts, _, _, truncated = sample_answers(policy, tok, prompts, batch_size=args.batch_size,
                                                max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                                                seed=seed, device=args.device, template=template)
        return texts, truncated

    # 1. probe: where did the last policy fail on its own training prompts? Then this round's prompts.
    previous, _ = load_prompts(rounds.training_prompts(r - 1), log=None)
    probe = rng.sample(previous, min(args.probe_prompts, len(previous)))
    t0 = time.time()
    probe_answers, _ = sample(probe, args.seed * 1000 + r)
    eval_texts = source.eval_prompt_texts()
    used = set()
    for k in range(2, r):
        used |= {row["prompt"] for row in read_jsonl(layout.dir(k) / "collect" / "prompts.jsonl")}
    rows, probe_stats = source.choose_prompts(rng, probe, probe_answers, args.prompts_per_round, eval_texts, used,
                                              previous, cost_model=layout.score_model(r - 1, "cost"))
    seen = [row["prompt"] for row in rows if row["prompt"] in eval_texts]
    if seen:
        raise RuntimeError(f"collect drew {len(seen)} evaluation prompts (e.g. {seen[0]!r})")
    source.check_unseen(rows)
    probe_stats["time_s"] = round(time.time() - t0, 1)

    # 2. K answers per prompt from the last policy
    K = args.samples_per_prompt
    texts, truncated = sample([row["prompt"] for row in rows for _ in range(K)], args.seed * 1000 + 500 + r)
    answers = [{**row, "answers": texts[i * K:(i + 1) * K], "truncated": truncated[i * K:(i + 1) * K]}
               for i, row in enumerate(rows)]

    # 3. pairs to label: distinct answers of one prompt (those the source can have ranked)
    pairs = make_pairs(answers, rng, r, args.pairs_per_prompt, source.rankable)
    if not pairs:  # not an error: the round's PPO still trains on its fresh (and red-team) prompts
        distinct = sum(len(distinct_answers(row)) > 1 for row in answers)
        why = (f"no prompt got two distinct answers in {K} samples (a collapsed policy?)" if not distinct else
               f"{distinct} of {len(rows)} prompts got two distinct answers, but no pair of them can be ranked")
        print(f"warning: round {r} collect: no pair to label: {why}. This round's score models retrain on the earlier "
              f"rounds' labels alone; sample more (--samples-per-prompt, --prompts-per-round) for new ones", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "prompts.jsonl", rows)
    write_jsonl(out / "answers.jsonl", answers)
    (out / "LABELLING.md").write_text(LABELLING_README)
    stats = {"round": r, "policy": str(policy_path), "prompts": len(rows),
             "red_team_prompts": sum(row["red_team"] for row in rows), "samples_per_prompt": K,
             "pairs": len(pairs), "probe": probe_stats, **source.answer_stats(answers)}
    (out / "collect.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_jsonl(out / "pairs.jsonl", pairs)  # the product: last
    print(f"collect: {len(rows)} prompts ({stats['red_team_prompts']} red-team), {len(rows) * K} answers, "
          f"{len(pairs)} pairs to label; probe of the last policy: "
          + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in probe_stats.items()
                      if k != "failure_cells"), flush=True)


def distinct_answers(row) -> list[str]:
    """A prompt's answers that can be paired: non-blank, each once, in the order sampled."""
    return list(dict.fromkeys(t for t in row["answers"] if t.strip()))


def make_pairs(answers, rng, r: int, pairs_per_prompt: int, rankable) -> list[dict]:
    """Up to `pairs_per_prompt` pairs of distinct answers per prompt, disjoint pairs first, as
    PKU-SafeRLHF rows with the label fields null; `rankable(prompt, a, b)` filters them."""
    pairs = []
    for row in answers:
        distinct = distinct_answers(row)
        rng.shuffle(distinct)
        order = [(distinct[i], distinct[i + 1]) for i in range(0, len(distinct) - 1, 2)]
        order += [p for p in itertools.combinations(distinct, 2) if p not in order]
        kept = 0
        for r0, r1 in order:
            if kept == pairs_per_prompt:
                break
            if not rankable(row["prompt"], r0, r1):
                continue
            extra = {("harmful_prompt" if k == "harmful" else k): row[k] for k in ("task", "harmful", "red_team")
                     if k in row}
            pairs.append({"prompt": row["prompt"], "response_0": r0, "response_1": r1,
                          **{f: None for f in LABEL_FIELDS}, "round": r, "pair_id": f"r{r}-{len(pairs):06d}", **extra})
            kept += 1
    return pairs
