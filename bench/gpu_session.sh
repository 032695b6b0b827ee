#!/usr/bin/env bash
# Everything that needs a GPU, in two calls of at most 10 minutes each (the lent device's limit):
#
#   bash bench/gpu_session.sh tests   # kernel + model-through-kernels tests on CUDA, bf16 included
#   bash bench/gpu_session.sh bench   # attention, log-prob, training-step, PPO and generation benchmarks
#
# Logs go to $OUT (the device tool brings that folder back) or bench/gpu_logs; the end of each
# log is printed last. Copy the numbers into bench/RESULTS.md with the device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-bench/gpu_logs}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(transformers|huggingface.hub|tokenizers|numpy|safetensors|sentencepiece) '
  # The kernels as this Triton compiles them for this GPU: registers, spills, shared memory (seconds; cached after).
  "$PY" bench/compile_kernels.py --arch "$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)')" \
    --first-config --causal-only --dtypes bfloat16 | tail -n 12
} 2>&1 | tee "$LOGS/env.log"

step() {  # step NAME COMMAND...: run, log, keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$LOGS/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
}

case "${1:-}" in
  tests)
    # One process (-n 0): the autotuning and graph tests time kernels and must have the GPU alone.
    # Every shape with each kernel's first config (compiling every autotune candidate for every
    # dtype and head dim would take many minutes), then the bf16 and model tests autotuned.
    KERNELS_AUTOTUNE=0 step pytest_kernels "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_attention.py \
      tests/test_logprob.py tests/test_model_kernels.py
    step pytest_autotuned "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_attention.py tests/test_logprob.py \
      tests/test_model_kernels.py -k "cuda or autocast or generate"
    # The captured decoding step (CUDA graph) against the static and eager steps, fp32 and bf16.
    step pytest_cuda_graph "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_model.py -k "cuda_graph or static or greedy"
    tail -n 25 "$LOGS/pytest_kernels.log"
    tail -n 10 "$LOGS/pytest_autotuned.log"
    tail -n 10 "$LOGS/pytest_cuda_graph.log"
    ;;
  bench)
    step bench_attention "$PY" bench/bench_attention.py
    step bench_attention_gqa "$PY" bench/bench_attention.py --dims 128 --lengths 2048 4096 --kv-heads-ratio 4
    step bench_logprob "$PY" bench/bench_logprob.py
    step bench_train "$PY" bench/bench_train.py --preset llama-3.2-1b --device cuda --dtype bfloat16 --batch 8 --seq 2048
    # PPO at 1B under torchrun with one rank: the FSDP2 path of real runs (nccl, bf16 mixed
    # precision, bf16 frozen models); six 1.2B models in a plain process would not fit in 80 GB.
    step bench_ppo "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 bench/bench_ppo.py \
      --preset llama-3.2-1b --batch-size 64 --max-new-tokens 256
    step bench_ppo_small "$PY" bench/bench_ppo.py --preset small --batch-size 64 --max-new-tokens 256
    # Sampling at 1B against transformers and the floors measured in the same run (the decode
    # steps' GEMMs, GEMMs + attention, weight bytes / copy rate), eager and CUDA-graph decoding;
    # then the CPU sweep's shapes (fp32, batch 16, 64 new tokens) on the GPU, eager only (one mode:
    # cheap). Every number also goes to the JSON next to the log.
    step bench_generate_1b "$PY" bench/bench_generate.py --sizes llama-3.2-1b --device cuda --dtype bfloat16 \
      --batch 64 --new-tokens 256 --decode eager,graph --json "$LOGS/bench_generate_1b.json"
    step bench_generate_sweep "$PY" bench/bench_generate.py --device cuda --decode eager \
      --json "$LOGS/bench_generate_sweep.json"
    for f in bench_attention bench_attention_gqa bench_logprob bench_train bench_ppo bench_ppo_small \
        bench_generate_1b bench_generate_sweep; do
      echo "---- $f"; tail -n 20 "$LOGS/$f.log"
    done
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh tests|bench" >&2
    exit 2
    ;;
esac
