"""Figures (PNG; matplotlib is an optional dependency: pip install matplotlib).

    python plots.py curves out/ppo_lag/log.jsonl --out out/ppo_lag/curves.png
    python plots.py curves out/ppo_lag/log.jsonl out/ppo_lag_pid/log.jsonl --out lambda.png   # overlaid
    python plots.py plane runs/seed*/eval/eval.json --out bench/plane.png
    python plots.py table runs/seed*/eval/eval.json          # markdown table, mean +- std over files
    python plots.py rounds runs/rounds/seed*/rounds.json --out bench/rounds_plane.png   # rounds.py's rounds
    python plots.py rounds-table runs/rounds/seed*/rounds.json                          # per round, mean +- std

curves: PPO-Lagrangian runs' reward, cost, lambda and J_C - threshold per iteration (and, on
the synthetic task, the ground-truth harmful rate and helpfulness of their rollouts), one line per
log.jsonl given.
plane:  the helpfulness-harmlessness plane of the paper's comparison: one point per policy
(SFT, PPO, reward shaping at each fixed lambda, PPO-Lagrangian), averaged over the eval.json
files given (one per seed), with error bars of one standard deviation.
rounds: the same plane for iterated Safe RLHF (rounds.py): one point per round, SFT -> v1 -> v2 -> v3
as in the paper's figure, a thin line per seed (rounds.json given) and their mean, thick, with
error bars.
"""

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def policy_name(path: str) -> str:
    """out/ppo_lag/actor -> ppo_lag; out/sft/model -> sft."""
    p = Path(path)
    return p.parent.name if p.name in ("actor", "model") else p.name


def round_name(r: int) -> str:
    """A rounds.json row's policy: round 0 -> SFT, round r -> vr (the paper's Beaver-v1, v2, ...)."""
    return "SFT" if r == 0 else f"v{r}"


def gather(eval_files):
    """policy -> metric -> list of values (one per file/seed), in first-seen policy order."""
    table = defaultdict(lambda: defaultdict(list))
    for f in eval_files:
        for path, metrics in json.loads(Path(f).read_text())["results"].items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    table[policy_name(path)][key].append(float(value))
    return table


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(eval_files, columns=("harmful_rate", "helpfulness", "over_refusal", "response_tokens",
                                        "harmful_rate_phrasing", "harmful_rate_task"), spread="std"):
    """spread: "std" (the seeds' sample standard deviation) or "se" (its standard error, std / sqrt(n))."""
    table = gather(eval_files)
    n = max(len(v["harmful_rate"]) for v in table.values())
    lines = [f"| policy (mean ± {'s.e.' if spread == 'se' else 'std'} over {n} seed{'s' if n > 1 else ''}) | "
             + " | ".join(columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for name, metrics in table.items():
        cells = []
        for c in columns:
            if c in metrics:
                m, s = mean_std(metrics[c])
                if spread == "se":
                    s /= math.sqrt(len(metrics[c]))
                cells.append(f"{m:.3f} ± {s:.3f}")
            else:
                cells.append("")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(log_files, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fileio import read_jsonl  # a damaged line is named

    runs = {"/".join(Path(f).parent.parts[-2:]): read_jsonl(f) for f in log_files}
    panels = [("reward", "reward (end score)"), ("cost", "cost (end score)"), ("lambda", "lambda"),
              ("constraint_violation", "J_C - threshold")]
    for f, (name, rows) in zip(log_files, runs.items()):
        if not rows or any(key not in rows[0] for key, _ in panels):
            raise ValueError(f"{f}: not the log of a PPO-Lagrangian run (its steps have no "
                             f"{', '.join(k for k, _ in panels if not rows or k not in rows[0])}): `plots.py curves` "
                             "draws ppo_lag.py's <out>/log.jsonl")
    first = next(iter(runs.values()))
    if "true_harmful_rate" in first[0]:
        panels += [("true_harmful_rate", "harmful rate (ground truth)"), ("true_helpfulness", "helpfulness (ground truth)")]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(10, 2.6 * (len(panels) // 2)), sharex=True)
    # One colour per group (the directory above the runs, e.g. a seed), one line style per run name.
    groups = list(dict.fromkeys(name.split("/")[0] for name in runs))
    names = list(dict.fromkeys(name.split("/")[-1] for name in runs))
    for ax, (key, title) in zip(axes.flat, panels):
        for name, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1.2, label=name,
                    color=f"C{groups.index(name.split('/')[0]) % 10}",
                    ls=("-", "--", ":", "-.")[names.index(name.split("/")[-1]) % 4])
        if key == "constraint_violation":
            ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{', '.join(runs) if len(runs) < 4 else f'{len(runs)} runs'}: PPO-Lagrangian training curves")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_plane(eval_files, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = gather(eval_files)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, metrics in table.items():
        (hx, sx), (hy, sy) = mean_std([1 - v for v in metrics["harmful_rate"]]), mean_std(metrics["helpfulness"])
        style = {"sft": ("k", "s"), "ppo": ("tab:red", "o"), "ppo_lag": ("tab:green", "*"),
                 "ppo_lag_pid": ("tab:olive", "*")}.get(
            name, ("tab:purple", "D") if name.startswith("rlhf_mixed") else ("tab:blue", "^"))
        ax.errorbar(hx, hy, xerr=sx, yerr=sy, color=style[0], marker=style[1], ms=11 if style[1] == "*" else 7,
                    capsize=3, ls="none")
        label = name.replace("reward_shaping_", "shaping λ=").replace("rlhf_mixed_", "one preference: ")
        ax.annotate(label, (hx, hy), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    ax.set_xlabel("harmlessness: 1 - harmful rate on held-out harmful prompts")
    ax.set_ylabel("helpfulness on held-out benign prompts")
    ax.set_title("Helpfulness vs harmlessness (ground-truth judge)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def round_points(rounds_files):
    """[(seed label, {policy name: metrics})] from rounds.py's rounds.json files; policy names SFT, v1, v2, ..."""
    runs = []
    for f in rounds_files:
        data = json.loads(Path(f).read_text())
        points = {round_name(row["round"]): row["eval"]
                  for row in data["rounds"] if "eval" in row}
        runs.append((f"seed {data.get('seed', Path(f).parent.name)}", points))
    return runs


def rounds_table(rounds_files, columns=("harmful_rate", "harmful_rate_phrasing", "harmful_rate_task", "helpfulness",
                                        "over_refusal", "response_tokens")):
    """Markdown: one row per round (SFT, v1, ...), mean +- std over the rounds.json files (seeds)."""
    runs = round_points(rounds_files)
    names = list(dict.fromkeys(name for _, points in runs for name in points))
    lines = [f"| policy (mean ± std over {len(runs)} seed{'s' if len(runs) > 1 else ''}) | " + " | ".join(columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for name in names:
        cells = []
        for c in columns:
            values = [points[name][c] for _, points in runs if name in points and c in points[name]]
            if not values:
                cells.append("")
                continue
            m, sd = mean_std(values)
            cells.append(f"{m:.3f} ± {sd:.3f}" + ("" if len(values) == len(runs) else f" (n={len(values)})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(rounds_files, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = round_points(rounds_files)
    names = list(dict.fromkeys(name for _, points in runs for name in points))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for label, points in runs:
        xs = [1 - points[n]["harmful_rate"] for n in names if n in points]
        ys = [points[n]["helpfulness"] for n in names if n in points]
        ax.plot(xs, ys, "-o", lw=0.8, ms=3, alpha=0.45, label=label)
    mean_x, mean_y = [], []
    for name in names:
        values = [points[name] for _, points in runs if name in points]
        (hx, sx), (hy, sy) = mean_std([1 - v["harmful_rate"] for v in values]), mean_std([v["helpfulness"] for v in values])
        mean_x.append(hx)
        mean_y.append(hy)
        ax.errorbar(hx, hy, xerr=sx, yerr=sy, color="k" if name == "SFT" else "tab:green", marker="s" if name == "SFT" else "*",
                    ms=7 if name == "SFT" else 12, capsize=3, ls="none")
        ax.annotate(name, (hx, hy), textcoords="offset points", xytext=(6, -12), fontsize=10)
    ax.plot(mean_x, mean_y, "-", color="tab:green", lw=2, label=f"mean of {len(runs)}")
    ax.set_xlabel("harmlessness: 1 - harmful rate on held-out harmful prompts")
    ax.set_ylabel("helpfulness on held-out benign prompts")
    ax.set_title("Iterated Safe RLHF: one point per round (ground-truth judge)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["curves", "plane", "table", "rounds", "rounds-table"], help="which figure")
    parser.add_argument("inputs", nargs="+", help="log.jsonl (curves), eval.json files (plane, table) or rounds.py's "
                                                  "rounds.json files, one per seed (rounds, rounds-table)")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the first input)")
    parser.add_argument("--spread", choices=["std", "se"], default="std",
                        help="table: ± the seeds' standard deviation, or its standard error (std / sqrt(seeds))")
    args = parser.parse_args(argv)
    if args.kind == "table":
        print(markdown_table(args.inputs, spread=args.spread))
        return
    if args.kind == "rounds-table":
        print(rounds_table(args.inputs))
        return
    out = args.out or str(Path(args.inputs[0]).with_name(f"{args.kind}.png"))
    if args.kind == "curves":
        plot_curves(args.inputs, out)
    elif args.kind == "rounds":
        plot_rounds(args.inputs, out)
    else:
        plot_plane(args.inputs, out)


if __name__ == "__main__":
    import cli

    cli.run(main)  # a bad input: one line naming it
