"""Training-step speed: our SFT forward+backward against transformers' LlamaForCausalLM on the same
weights and shapes.

    python bench/bench_train.py                          # tiny preset, CPU, 32 x 96 tokens
    python bench/bench_train.py --preset llama-3.2-1b --device cuda --dtype bfloat16 --batch 8 --seq 2048

Ours: model(ids, mask, targets=...) -> fused log-probs -> masked token-mean NLL -> backward.
Theirs: LlamaForCausalLM(input_ids, labels=...) -> cross-entropy loss -> backward.
Prints tokens/s of each and the ratio (measured in this run), and on CUDA the MFU of ours
(6 x parameters x tokens + attention FLOPs, over the GPU's dense bf16 peak given by --peak-tflops).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hf_io  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="tiny", help="model.PRESETS name (llama-3.2-1b for the 1B-class shape)")
parser.add_argument("--batch", type=int, default=32, help="sequences per step")
parser.add_argument("--seq", type=int, default=96, help="tokens per sequence")
parser.add_argument("--repeats", type=int, default=5, help="timed steps of each; the median is reported")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU (H100 SXM: 989)")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
args = parser.parse_args()

import transformers  # noqa: E402  (bench-only dependency)

if args.threads:
    torch.set_num_threads(args.threads)
device, dtype = torch.device(args.device), getattr(torch, args.dtype)
margs = ModelArgs.from_name(args.preset)

ours = Transformer(margs)
ours.init_weights(seed=0)
with tempfile.TemporaryDirectory() as tmp:
    hf_io.save_pretrained(ours, tmp)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device)
ours = ours.to(device=device, dtype=dtype)
ours.train()
theirs.train()

g = torch.Generator().manual_seed(0)
ids = torch.randint(3, margs.vocab_size, (args.batch, args.seq), generator=g).to(device)
mask = torch.ones_like(ids)
# The loss covers the second half of each sequence (the "response"), as in SFT.
loss_mask = torch.zeros_like(ids, dtype=torch.bool)
loss_mask[:, args.seq // 2:] = True
labels = ids.masked_fill(~loss_mask, -100)


def step_ours():
    logp = ours(ids[:, :-1], mask[:, :-1], targets=ids[:, 1:])
    m = loss_mask[:, 1:]
    (-(logp * m).sum() / m.sum()).backward()


def step_theirs():
    theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, model):
    fn()
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


t_theirs = time_it(step_theirs, theirs)
t_ours = time_it(step_ours, ours)
tokens = args.batch * args.seq
print(f"device={device} dtype={args.dtype} preset={args.preset} params={ours.num_params() / 1e6:.1f}M "
      f"batch={args.batch}x{args.seq} threads={torch.get_num_threads()}")
print(f"transformers fwd+bwd: {t_theirs * 1e3:9.1f} ms  {tokens / t_theirs:10.0f} tokens/s")
print(f"ours fwd+bwd:         {t_ours * 1e3:9.1f} ms  {tokens / t_ours:10.0f} tokens/s")
print(f"ratio (ours / transformers tokens/s): {t_theirs / t_ours:.2f}x")
if device.type == "cuda":
    # Every weight matrix does a matmul except the input embedding (a tied one still does, as the head).
    n_params = ours.num_params() - (0 if margs.tie_embeddings else margs.vocab_size * margs.dim)
    flops = 6 * n_params * tokens + 6 * margs.n_layers * args.batch * args.seq**2 * margs.dim  # causal attn ~ half of 12
    print(f"MFU (ours): {flops / t_ours / (args.peak_tflops * 1e12):.1%}")
