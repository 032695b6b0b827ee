#!/usr/bin/env bash
# The paper's comparison on the embedded task, over several seeds:
#   SFT, PPO (reward only), reward shaping at fixed lambdas, PPO-Lagrangian, and standard RLHF on one overall
#   preference per pair (rlhf_mixed: data/mixed.py), each seed with its own SFT, reward and cost models
#   (same synthetic task), judged on held-out prompts.
#
#   bash bench/reproduce.sh              # seeds 0 1 2 -> runs/seed*/, bench/plane.png, bench/curves.png
#   bash bench/reproduce.sh 0 1 2 3 4    # more seeds
#
# Seeds run in parallel, one CPU thread each, as many at a time as there are cores. A seed that
# was interrupted resumes where it stopped (pipeline.py skips finished stages).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(0 1 2); fi
ALGOS="ppo_lag ppo reward_shaping:0.5 reward_shaping:1 reward_shaping:2 reward_shaping:8 rlhf_mixed:consistent rlhf_mixed:consistent:labels rlhf_mixed:crowd-0.5 rlhf_mixed:crowd-1 rlhf_mixed:crowd-2"
JOBS=${JOBS:-$(nproc)}
mkdir -p runs
python -c "from data.synthetic import ensure_synthetic; ensure_synthetic('runs/synthetic', seed=0)"
for seed in "${SEEDS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  echo "seed $seed -> runs/seed$seed (log: runs/seed$seed.log)"
  OMP_NUM_THREADS=1 python pipeline.py --seed "$seed" --out "runs/seed$seed" --algos $ALGOS \
      --synthetic-dir runs/synthetic > "runs/seed$seed.log" 2>&1 &
done
wait
EVALS=$(for seed in "${SEEDS[@]}"; do echo "runs/seed$seed/eval/eval.json"; done)
python plots.py table $EVALS | tee runs/table.md
python plots.py plane $EVALS --out bench/plane.png
python plots.py curves "runs/seed${SEEDS[0]}/ppo_lag/log.jsonl" --out bench/curves.png
