"""Figures (PNG; matplotlib is an optional dependency: pip install matplotlib).

    python plots.py curves out/ppo_lag/log.jsonl --out out/ppo_lag/curves.png
    python plots.py curves out/ppo_lag/log.jsonl out/ppo_lag_pid/log.jsonl --out lambda.png   # overlaid
    python plots.py plane runs/seed*/eval/eval.json --out bench/plane.png
    python plots.py table runs/seed*/eval/eval.json          # markdown table, mean +- std over files

curves: PPO-Lagrangian runs' reward, cost, lambda and J_C - threshold per iteration (and, on
the synthetic task, the ground-truth harmful rate and helpfulness of their rollouts), one line per
log.jsonl given.
plane:  the helpfulness-harmlessness plane of the paper's comparison: one point per policy
(SFT, PPO, reward shaping at each fixed lambda, PPO-Lagrangian), averaged over the eval.json
files given (one per seed), with error bars of one standard deviation.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def policy_name(path: str) -> str:
    """out/ppo_lag/actor -> ppo_lag; out/sft/model -> sft."""
    p = Path(path)
    return p.parent.name if p.name in ("actor", "model") else p.name


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
                                        "harmful_rate_phrasing", "harmful_rate_task")):
    table = gather(eval_files)
    n = max(len(v["harmful_rate"]) for v in table.values())
    lines = [f"| policy (mean ± std over {n} seed{'s' if n > 1 else ''}) | " + " | ".join(columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for name, metrics in table.items():
        cells = []
        for c in columns:
            if c in metrics:
                m, s = mean_std(metrics[c])
                cells.append(f"{m:.3f} ± {s:.3f}")
            else:
                cells.append("")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(log_files, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"/".join(Path(f).parent.parts[-2:]): [json.loads(line) for line in Path(f).read_text().splitlines()
                                                  if line.strip()] for f in log_files}
    first = next(iter(runs.values()))
    panels = [("reward", "reward (end score)"), ("cost", "cost (end score)"), ("lambda", "lambda"),
              ("constraint_violation", "J_C - threshold")]
    if "true_harmful_rate" in first[0]:
        panels += [("true_harmful_rate", "harmful rate (ground truth)"), ("true_helpfulness", "helpfulness (ground truth)")]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(10, 2.6 * (len(panels) // 2)), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1.2, label=name)
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
            name, ("tab:blue", "^"))
        ax.errorbar(hx, hy, xerr=sx, yerr=sy, color=style[0], marker=style[1], ms=11 if style[1] == "*" else 7,
                    capsize=3, ls="none")
        ax.annotate(name.replace("reward_shaping_", "shaping λ="), (hx, hy), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    ax.set_xlabel("harmlessness: 1 - harmful rate on held-out harmful prompts")
    ax.set_ylabel("helpfulness on held-out benign prompts")
    ax.set_title("Helpfulness vs harmlessness (ground-truth judge)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["curves", "plane", "table"], help="which figure")
    parser.add_argument("inputs", nargs="+", help="log.jsonl (curves) or eval.json files (plane, table)")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the first input)")
    args = parser.parse_args(argv)
    if args.kind == "table":
        print(markdown_table(args.inputs))
        return
    out = args.out or str(Path(args.inputs[0]).with_name(f"{args.kind}.png"))
    if args.kind == "curves":
        plot_curves(args.inputs, out)
    else:
        plot_plane(args.inputs, out)


if __name__ == "__main__":
    main()
