"""The rounds' report: <out>/rounds.json, one row per policy (SFT, then v1, v2, ...), and its table.

Each row holds the held-out evaluation, the round's threshold and its derivation, how its PPO ended
(λ, KL, cost), its score models' held-out evaluation, what collect and label saw, and the time each step
took. `python plots.py rounds <out>/rounds.json` draws the plane.
"""

from __future__ import annotations

import json

from fileio import read_jsonl, write_json


def summary(rounds, n_rounds: int) -> dict:
    """rounds.json of a rounds.py run (`rounds`: its Rounds), printed as a table."""
    from evaluate import harm_by_task_line
    from plots import round_name

    layout = rounds.layout
    rows = []
    for r in range(1, n_rounds + 1):
        rows += round_rows(rounds, r)
    result = {"out": str(layout.out), "seed": rounds.args.seed, "rounds": rows, "timings": rounds.steps.timings}
    write_json(layout.out / "rounds.json", result)
    judged = any("eval" in row for row in rows)
    how = ("held-out prompts, ground-truth judge" if judged else
           "no judge: each policy against the last in the arena, each round's reward and cost models judging")
    print(f"\n== rounds ({how}) -> {layout.out / 'rounds.json'}")
    print(markdown(rows))
    if judged:
        print("harmful answers by task (* held out of every round):")
    for row in rows:
        if "harmful_by_task" in row.get("eval", {}):
            print(f"  {round_name(row['round'])}: {harm_by_task_line(row['eval'])}")
    return result


def round_rows(rounds, r: int) -> list[dict]:
    """Round r's row (and SFT's before round 1's, from round 1's evaluation)."""
    from plots import policy_name

    layout, d, rows = rounds.layout, rounds.layout.dir(r), []
    row = {"round": r, "policy": str(layout.actor(r))}
    if layout.eval_json(r).exists():
        results = json.loads(layout.eval_json(r).read_text())["results"]
        by_name = {policy_name(k): v for k, v in results.items()}
        row["eval"] = results.get(str(layout.actor(r))) or by_name.get("ppo_lag") or list(results.values())[-1]
        if r == 1 and "sft" in by_name:
            rows.append({"round": 0, "policy": str(layout.sft), "eval": by_name["sft"]})
    arena = d / "arena" / "arena.json"
    if arena.exists():
        row["arena_vs_last"] = json.loads(arena.read_text())
    row["threshold"] = rounds.threshold_of(r)
    if (d / "threshold.json").exists():
        row["threshold_derivation"] = {k: v for k, v in json.loads((d / "threshold.json").read_text()).items()
                                       if k != "score_stats"}
    elif r == 1 and (layout.score_model(1, "cost") / "config.json").exists():
        try:
            row["threshold_derivation"] = {k: v for k, v in rounds.derive(1).items() if k != "score_stats"}
        except (ValueError, KeyError):
            pass
    log = d / "ppo_lag" / "log.jsonl"
    if log.exists():
        lines = read_jsonl(log)
        tail = lines[-8:]
        row["ppo"] = {"iterations": len(lines), "final_lambda": lines[-1].get("lambda"),
                      "kl_last8": sum(x["kl"] for x in tail) / len(tail),
                      "cost_last8": sum(x["cost"] for x in tail) / len(tail),
                      "reward_last8": sum(x["reward"] for x in tail) / len(tail)}
    for objective in ("reward", "cost"):
        ev = d / f"{objective}_model" / "eval.json"
        if ev.exists():
            row[f"{objective}_model_eval"] = json.loads(ev.read_text())
    for name in ("collect", "label"):
        f = d / name / f"{name}.json"
        if f.exists():
            row[name] = json.loads(f.read_text())
    row["time_s"] = {k.split(" ", 1)[1]: v for k, v in rounds.steps.timings.items() if k.startswith(f"round{r} ")}
    return rows + [row]


def markdown(rows) -> str:
    """One line per policy: SFT, then v1, v2, ... (held-out metrics; the round's threshold, lambda and
    KL at the end of its PPO; the pairs labelled; how last round's cost model read this round's
    answers of its own policy, against the ground truth)."""
    from plots import round_name

    cols = [("harmful_rate", "harmful"), ("harmful_rate_phrasing", "harmful (phrasing)"),
            ("harmful_rate_task", "harmful (task)"), ("helpfulness", "helpful"), ("over_refusal", "over-refusal"),
            ("response_tokens", "tokens")]
    # Without the judge (real data), each round met the last in the arena: its win rates and safe shares.
    arena = not any("eval" in row for row in rows) and any("arena_vs_last" in row for row in rows)
    titles = (["vs last: reward wins", "cost wins", "safe (last)", "safe (this)"] if arena
              else [t for _, t in cols])
    lines = ["| policy | " + " | ".join(titles)
             + " | threshold | λ end | KL | new pairs | last CM sign acc | last CM harmful recall |",
             "| --- |" + " --- |" * (len(titles) + 6)]

    def fmt(value, digits=3):
        return "" if value is None else f"{value:.{digits}f}"

    for row in rows:
        m = row.get("eval", {})
        ppo = row.get("ppo", {})
        diag = row.get("label", {}).get("last_models_on_new_answers", {})
        if arena:
            a = row.get("arena_vs_last", {})
            cells = [fmt(a.get("reward_win_rate")), fmt(a.get("cost_win_rate")),
                     fmt(a.get("baseline", {}).get("safe_rate")), fmt(a.get("candidate", {}).get("safe_rate"))]
        else:
            cells = [fmt(m.get(k)) for k, _ in cols]
            if m.get("harmful_rate_se") is not None:  # sampling noise: a round "no worse" within it is a tie
                cells[0] += f" ± {m['harmful_rate_se']:.3f}"
        cells += [fmt(row.get("threshold")), fmt(ppo.get("final_lambda"), 2), fmt(ppo.get("kl_last8"), 2),
                  str(row.get("label", {}).get("pairs", "")), fmt(diag.get("cost_sign_accuracy_vs_truth")),
                  fmt(diag.get("harmful_recall"))]
        lines.append(f"| {round_name(row['round'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
