"""PPO-Lagrangian throughput and where the time goes (generation, scoring, learning).

    python bench/bench_ppo.py                         # the embedded default's models (out/sft, out/*_model) on CPU
    python bench/bench_ppo.py --preset llama-3.2-1b --batch-size 64 --max-new-tokens 256   # random 1B-class models (GPU)

Runs ppo_lag.py for a few iterations into a temporary directory and reports, from its log.jsonl,
samples/s and the share of each phase (the first iteration, which includes warm-up, is skipped).
With --preset, all six models are random ones of that shape: their answers run to the length
limit, the worst case for generation.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default=None, help="random models of this shape (model.PRESETS, e.g. llama-3.2-1b) instead of out/")
parser.add_argument("--steps", type=int, default=6, help="PPO iterations to run")
parser.add_argument("--batch-size", type=int, default=64, help="prompts per iteration")
parser.add_argument("--micro-batch-size", type=int, default=32, help="sequences per forward pass")
parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
parser.add_argument("--device", default="auto")
args = parser.parse_args()

import ppo_lag  # noqa: E402
from data.synthetic import ensure_synthetic  # noqa: E402
import hf_io  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    task = ensure_synthetic(ROOT / "out" / "synthetic", seed=0)
    if args.preset:
        margs = ModelArgs.from_name(args.preset)
        lm = Transformer(margs)
        lm.init_weights(seed=0)
        hf_io.save_pretrained(lm, tmp / "sft", extra_files=[task.tokenizer])
        del lm
        for name in ("rm", "cm"):
            hf_io.save_pretrained(hf_io.load_pretrained(tmp / "sft", head="score"), tmp / name)
        paths = [tmp / "sft", tmp / "rm", tmp / "cm"]
    else:
        paths = [ROOT / "out/sft/model", ROOT / "out/reward_model/model", ROOT / "out/cost_model/model"]
        missing = [str(p) for p in paths if not (p / "config.json").exists()]
        if missing:
            sys.exit(f"missing {', '.join(missing)}: run sft.py and train_score.py first, or pass --preset")
    ppo_lag.main(["--actor", str(paths[0]), "--reward-model", str(paths[1]), "--cost-model", str(paths[2]),
                  "--synthetic-dir", str(ROOT / "out" / "synthetic"), "--out", str(tmp / "run"),
                  "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--micro-batch-size", str(args.micro_batch_size), "--max-new-tokens", str(args.max_new_tokens),
                  "--save-every", str(10**9), "--device", args.device])
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()][1:]

phases = {k: statistics.mean(r[f"time_{k}"] for r in log) for k in ("generate", "score", "learn")}
total = sum(phases.values())
device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
print(f"\ndevice={device} models={'random ' + args.preset if args.preset else 'out/ (trained tiny)'} "
      f"batch={args.batch_size} max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")
print(f"samples/s: {statistics.mean(r['samples_per_s'] for r in log):.1f}   "
      f"mean answer length: {statistics.mean(r['response_length'] for r in log):.1f} tokens")
for k, v in phases.items():
    print(f"  {k:9s} {v:7.2f} s/iteration  {v / total:6.1%}")
