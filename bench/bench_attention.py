"""Benchmark rlhf_kernels.flash_attention_triton against torch SDPA (flash backend), causal.

On a GPU, for each head dim and sequence length, prints forward and forward+backward
TFLOP/s of both and their ratio (Triton / SDPA), measured in the same run. The
token count per batch is held fixed (batch = tokens // T) and the model width is
fixed (heads = width // D), as in the FlashAttention papers.

    python bench/bench_attention.py                       # bf16, D = 64 and 128, T = 512..8192
    python bench/bench_attention.py --dims 128 --lengths 2048 4096 --kv-heads-ratio 4

FLOPs counted: 4 * B * H * T^2 * D for the forward (two matmuls), halved for
causal attention; the backward counts 2.5x the forward (five matmuls, not the
recomputation). This is the convention of the FlashAttention benchmarks.

Without a GPU there is nothing meaningful to time for the Triton kernels (the
interpreter is orders of magnitude slower), so the script says so and runs a tiny
fp32 sanity comparison of the PyTorch path against naive attention instead.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rlhf_kernels  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192], help="sequence lengths")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * T, held fixed")
    parser.add_argument("--width", type=int, default=2048, help="heads * D, held fixed")
    parser.add_argument("--kv-heads-ratio", type=int, default=1, help="query heads per kv head (GQA)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--warmup", type=int, default=25, help="ms of warmup per measurement")
    parser.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    return parser.parse_args()


def attention_flops(batch, heads, length, head_dim, causal=True):
    forward = 4 * batch * heads * length * length * head_dim
    return forward * (0.5 if causal else 1.0)


def bench_gpu(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, dtype {args.dtype}, causal, "
          f"tokens {args.tokens}, width {args.width}, GQA ratio {args.kv_heads_ratio}")
    header = f"{'D':>4} {'T':>6} {'B':>4} {'Hq':>4} | {'fwd TFLOP/s':>23} {'ratio':>6}"
    if not args.forward_only:
        header += f" | {'fwd+bwd TFLOP/s':>23} {'ratio':>6}"
    print(header)
    print(f"{'':>21} | {'triton':>11} {'sdpa':>11} {'':>6}" + ("" if args.forward_only else f" | {'triton':>11} {'sdpa':>11}"))

    for head_dim in args.dims:
        for length in args.lengths:
            print(bench_one(args, head_dim, length, dtype, device), flush=True)
    print("ratio = SDPA time / Triton time (> 1 means the Triton kernel is faster)")


def bench_one(args, head_dim, length, dtype, device):
    """One table row: TFLOP/s of both implementations at this head dim and length."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_heads = args.width // head_dim
    kv_heads = q_heads // args.kv_heads_ratio
    batch = max(1, args.tokens // length)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, length, q_heads, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(batch, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(batch, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    grad_out = torch.randn_like(q)

    def triton_forward():
        return rlhf_kernels.flash_attention_triton(q, k, v, causal=True)

    def sdpa_forward():
        # Same memory, viewed as [B, H, T, D]; SDPA accepts these strides without a copy.
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=kv_heads != q_heads)
        return out.transpose(1, 2)

    with torch.no_grad():  # sanity: both compute the same thing
        max_diff = (triton_forward().float() - sdpa_forward().float()).abs().max().item()

    flops = attention_flops(batch, q_heads, length, head_dim)
    row = f"{head_dim:>4} {length:>6} {batch:>4} {q_heads:>4} |"
    with torch.no_grad():
        t_fwd = triton.testing.do_bench(triton_forward, warmup=args.warmup, rep=args.rep)
        s_fwd = triton.testing.do_bench(sdpa_forward, warmup=args.warmup, rep=args.rep)
    row += f" {flops / t_fwd * 1e-9:>11.1f} {flops / s_fwd * 1e-9:>11.1f} {s_fwd / t_fwd:>6.2f}"
    if not args.forward_only:
        def triton_step():
            torch.autograd.grad(triton_forward(), (q, k, v), grad_out)

        def sdpa_step():
            torch.autograd.grad(sdpa_forward(), (q, k, v), grad_out)

        t_step = triton.testing.do_bench(triton_step, warmup=args.warmup, rep=args.rep)
        s_step = triton.testing.do_bench(sdpa_step, warmup=args.warmup, rep=args.rep)
        step_flops = 3.5 * flops
        row += f" | {step_flops / t_step * 1e-9:>11.1f} {step_flops / s_step * 1e-9:>11.1f} {s_step / t_step:>6.2f}"
    return row + f"   (max |triton - sdpa| = {max_diff:.1e})"


def sanity_cpu():
    print("No CUDA device: the Triton kernels are only timed on a GPU (the interpreter is not a benchmark).")
    print("Running a tiny fp32 sanity comparison of the PyTorch path against naive attention instead.\n")
    gen = torch.Generator().manual_seed(0)
    batch, length, q_heads, kv_heads, head_dim = 2, 256, 8, 2, 64
    q = torch.randn(batch, length, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, length, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, length, kv_heads, head_dim, generator=gen)

    def naive():
        group = q_heads // kv_heads
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, 2)) * head_dim**-0.5
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v.repeat_interleave(group, 2))

    def torch_path():
        return rlhf_kernels.flash_attention_torch(q, k, v, causal=True)

    def seconds(fn, reps=20):
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps

    max_diff = (naive() - torch_path()).abs().max().item()
    t_naive, t_torch = seconds(naive), seconds(torch_path)
    print(f"B={batch} T={length} Hq={q_heads} Hkv={kv_heads} D={head_dim} fp32, causal")
    print(f"  naive einsum attention: {t_naive * 1e3:7.2f} ms")
    print(f"  flash_attention_torch:  {t_torch * 1e3:7.2f} ms   ({t_naive / t_torch:.2f}x naive)")
    print(f"  max |difference| = {max_diff:.1e}")


def main():
    args = parse_args()
    if torch.cuda.is_available() and rlhf_kernels.TRITON_AVAILABLE and not rlhf_kernels.TRITON_INTERPRETED:
        bench_gpu(args)
    else:
        sanity_cpu()


if __name__ == "__main__":
    main()
