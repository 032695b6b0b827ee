"""Sampling speed: model.generate against transformers' generate on identical weights.

    python bench/bench_generate.py                       # tiny preset, CPU, batch 16, 64 new tokens
    python bench/bench_generate.py --preset small --device cuda --dtype bfloat16

Both sample the same number of tokens (no EOS, so no row stops early) from the same left-padded
prompts; the script prints tokens/s of each and the ratio, all measured in this one run.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs, Transformer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="tiny", help="ModelArgs preset (model.PRESETS)")
parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are shorter (left padding)")
parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt")
parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; the median is reported")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
args = parser.parse_args()

import transformers  # noqa: E402  (test/bench-only dependency)

if args.threads:
    torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)
device = torch.device(args.device)
model_args = ModelArgs.from_name(args.preset)

ours = Transformer(model_args).to(device)
ours.init_weights(seed=0)
with tempfile.TemporaryDirectory() as tmp:
    ours.save_pretrained(tmp)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
ours = ours.to(dtype).eval()

g = torch.Generator().manual_seed(0)
lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
lengths[0] = args.prompt_len
ids = torch.randint(3, model_args.vocab_size, (args.batch, args.prompt_len), generator=g)
mask = (torch.arange(args.prompt_len)[None] >= args.prompt_len - lengths[:, None]).long()
ids = (ids * mask).to(device)
mask = mask.to(device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours():
    return ours.generate(ids, mask, max_new_tokens=args.new_tokens, temperature=args.temperature)


def run_theirs():
    kwargs = dict(do_sample=args.temperature > 0, top_p=1.0, top_k=0)
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
    with torch.no_grad():
        return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, pad_token_id=0, **kwargs)


def time_it(fn):
    fn()  # warm-up
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
    return statistics.median(times)


# Interleave so that machine noise hits both alike.
t_theirs = time_it(run_theirs)
t_ours = time_it(run_ours)
tokens = args.batch * args.new_tokens
print(f"device={device} dtype={args.dtype} preset={args.preset} params={ours.num_params() / 1e6:.2f}M "
      f"batch={args.batch} prompt<={args.prompt_len} new={args.new_tokens} threads={torch.get_num_threads()}")
print(f"transformers generate: {t_theirs * 1e3:8.1f} ms  {tokens / t_theirs:9.0f} tokens/s")
print(f"model.generate:        {t_ours * 1e3:8.1f} ms  {tokens / t_ours:9.0f} tokens/s")
print(f"ratio (ours / transformers tokens/s): {t_theirs / t_ours:.2f}x")
