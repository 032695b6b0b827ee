#!/usr/bin/env bash
# Decoupled preferences (Safe RLHF) vs one overall preference per pair (standard RLHF), on the embedded
# task, over several seeds: the ablation of the paper's premise (data/mixed.py says how each single-
# preference annotator labels; their modes and parameters were fixed before these runs).
#
#   bash bench/decoupling.sh             # seeds 0 1 2 -> runs/seed*/, runs/decoupling.md, bench/decoupling_plane.png
#
# The same runs/seed<S> folders as bench/reproduce.sh: the SFT, reward and cost models and PPO-Lagrangian
# are shared, and whichever script runs second skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(0 1 2); fi
ALGOS="ppo_lag ppo rlhf_mixed:consistent rlhf_mixed:consistent:labels rlhf_mixed:crowd-0.5 rlhf_mixed:crowd-1 rlhf_mixed:crowd-2"
JOBS=${JOBS:-$(nproc)}
mkdir -p runs
python -c "from data.synthetic import ensure_synthetic; ensure_synthetic('runs/synthetic', seed=0)"
for seed in "${SEEDS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  echo "seed $seed -> runs/seed$seed (log: runs/seed$seed.decoupling.log)"
  OMP_NUM_THREADS=1 python pipeline.py --seed "$seed" --out "runs/seed$seed" --algos $ALGOS \
      --synthetic-dir runs/synthetic > "runs/seed$seed.decoupling.log" 2>&1 &
done
wait
EVALS=$(for seed in "${SEEDS[@]}"; do echo "runs/seed$seed/eval/eval.json"; done)
python plots.py table $EVALS --spread se | tee runs/decoupling.md
python plots.py plane $EVALS --out bench/decoupling_plane.png
