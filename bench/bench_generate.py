"""Sampling speed: model.generate against transformers' generate on identical weights.

    python bench/bench_generate.py                       # size sweep: tiny, d256, d512; CPU, batch 16, 64 new tokens
    python bench/bench_generate.py --sizes d512 --repeats 9
    python bench/bench_generate.py --preset small --device cuda --dtype bfloat16   # one preset, as before

Sizes are model presets (model.PRESETS) or the sweep shapes below (all 4 layers, vocabulary 2048,
grouped-query attention like tiny). Both sample the same number of tokens (no EOS, so no row stops
early) from the same left-padded prompts. The timed runs of the two alternate, so that machine
noise hits both alike; each line gives tokens/s at the median time and the ratio of the medians.
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
from model import PRESETS, ModelArgs, Transformer  # noqa: E402

# Shapes between tiny and the GPU presets, where per-op overhead no longer dominates a CPU step.
SWEEP_SIZES: dict[str, dict] = {
    "d256": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, max_seq_len=256),
    "d512": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, max_seq_len=256),
}
DEFAULT_SIZES = "tiny,d256,d512"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sizes", default=None,
                    help=f"comma-separated presets or sweep sizes ({', '.join(SWEEP_SIZES)}); "
                         f"default {DEFAULT_SIZES}, or just --preset when that is given")
parser.add_argument("--preset", default=None, help="measure this one ModelArgs preset (model.PRESETS)")
parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are shorter (left padding)")
parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt")
parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; the median is reported")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
args = parser.parse_args()
sizes = (args.sizes or (args.preset if args.preset else DEFAULT_SIZES)).split(",")
for size in sizes:
    if size not in SWEEP_SIZES and size not in PRESETS:
        parser.error(f"unknown size {size!r}; known: {', '.join([*SWEEP_SIZES, *PRESETS])}")

import transformers  # noqa: E402  (test/bench-only dependency)

if args.threads:
    torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)
device = torch.device(args.device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
    return time.perf_counter() - t0


def bench(size: str):
    model_args = ModelArgs(**SWEEP_SIZES[size]) if size in SWEEP_SIZES else ModelArgs.from_name(size)
    ours = Transformer(model_args).to(device)
    ours.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save_pretrained(ours, tmp)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    ours = ours.to(dtype).eval()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
    lengths[0] = args.prompt_len
    ids = torch.randint(3, model_args.vocab_size, (args.batch, args.prompt_len), generator=g)
    mask = (torch.arange(args.prompt_len)[None] >= args.prompt_len - lengths[:, None]).long()
    ids = (ids * mask).to(device)
    mask = mask.to(device)

    def run_ours():
        return ours.generate(ids, mask, max_new_tokens=args.new_tokens, temperature=args.temperature)

    def run_theirs():
        kwargs = dict(do_sample=args.temperature > 0, top_p=1.0, top_k=0)
        if args.temperature > 0:
            kwargs["temperature"] = args.temperature
        with torch.no_grad():
            return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, pad_token_id=0, **kwargs)

    run_theirs(), run_ours()  # warm-up
    t_theirs, t_ours = [], []
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        t_theirs.append(timed(run_theirs))
        t_ours.append(timed(run_ours))
    t_theirs, t_ours = statistics.median(t_theirs), statistics.median(t_ours)
    tokens = args.batch * args.new_tokens
    print(f"{size:>12} {ours.num_params() / 1e6:7.2f}M | {t_theirs * 1e3:8.1f} ms {tokens / t_theirs:8.0f} tok/s | "
          f"{t_ours * 1e3:8.1f} ms {tokens / t_ours:8.0f} tok/s | {t_theirs / t_ours:5.2f}x", flush=True)


print(f"device={device} dtype={args.dtype} batch={args.batch} prompt<={args.prompt_len} new={args.new_tokens} "
      f"temperature={args.temperature} threads={torch.get_num_threads()} median of {args.repeats}")
print(f"{'size':>12} {'params':>8} | {'transformers generate':>27} | {'model.generate':>27} | ratio (ours / transformers)")
for size in sizes:
    bench(size)
