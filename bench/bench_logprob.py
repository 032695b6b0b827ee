"""Benchmark fused_linear_logprobs against the naive log_softmax(hidden @ weight.T).gather(...).

Both compute per-token log-probs of N target tokens over a V-word vocabulary and
the gradients for hidden [N, D] and weight [V, D] (loss = sum of log-probs). The
script reports time per forward+backward step and the peak memory the step adds
on top of its inputs, with ratios fused / naive measured in the same run.

    python bench/bench_logprob.py                           # GPU: N=16k, V=32k and 128k, D=4096, bf16
    python bench/bench_logprob.py --rows 1024 --vocabs 32000 # smaller

On a GPU the fused path is the Triton kernel; peak memory is
torch.cuda.max_memory_allocated above the inputs.

On CPU the fused path is the chunked PyTorch implementation (the Triton
interpreter is not a benchmark). Each variant runs in a fresh subprocess, and its
peak is the growth of the process's resident set (Linux VmHWM, reset through
/proc/self/clear_refs after the inputs exist; ru_maxrss if that is not allowed),
because tracemalloc does not see torch's allocations. That is what the process
really holds, including memory glibc keeps cached after torch frees it (run with
MALLOC_MMAP_THRESHOLD_=65536 to see closer to the live-tensor peak). CPU
defaults are small so the run takes well under a minute.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rlhf_kernels  # noqa: E402

ON_GPU = torch.cuda.is_available() and rlhf_kernels.TRITON_AVAILABLE and not rlhf_kernels.TRITON_INTERPRETED


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384 if ON_GPU else 1024, help="N, tokens")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256] if ON_GPU else [32000, 128256],
                        help="V, vocabulary sizes")
    parser.add_argument("--dim", type=int, default=4096 if ON_GPU else 256, help="D, hidden size")
    parser.add_argument("--dtype", default="bf16" if ON_GPU else "fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--entropy", action="store_true", help="also compute the entropy and add it to the loss")
    parser.add_argument("--reps", type=int, default=10 if ON_GPU else 2, help="timed repetitions (CPU)")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    return parser.parse_args()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(args, vocab, device):
    """Inputs built in place, so that creating them leaves no transient peak behind."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.empty(args.rows, args.dim, device=device, dtype=dtype).normal_(generator=gen).requires_grad_()
    weight = torch.empty(vocab, args.dim, device=device, dtype=dtype).normal_(std=args.dim**-0.5, generator=gen)
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (args.rows,), device=device, generator=gen)
    return hidden, weight, targets


def naive_step(hidden, weight, targets, entropy):
    log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    loss = log_probs.gather(-1, targets[:, None]).sum()
    if entropy:
        loss = loss - (log_probs.exp() * log_probs).sum()
    return torch.autograd.grad(loss, (hidden, weight))


def fused_step(fused, hidden, weight, targets, entropy):
    if entropy:
        logp, ent = fused(hidden, weight, targets, return_entropy=True)
        loss = logp.sum() + ent.sum()
    else:
        loss = fused(hidden, weight, targets).sum()
    return torch.autograd.grad(loss, (hidden, weight))


def step_function(variant, entropy):
    if variant == "naive":
        return lambda h, w, t: naive_step(h, w, t, entropy)
    # On a GPU the dispatching entry point runs the Triton kernels; on CPU, call the
    # PyTorch path explicitly so that TRITON_INTERPRET in the environment cannot
    # turn this into a benchmark of the interpreter.
    fused = rlhf_kernels.fused_linear_logprobs if ON_GPU else rlhf_kernels.fused_linear_logprobs_torch
    return lambda h, w, t: fused_step(fused, h, w, t, entropy)


# ---------------------------------------------------------------------------------------- GPU


def bench_gpu(args):
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}, "
          f"N={args.rows}, D={args.dim}, entropy={args.entropy}")
    print(f"{'V':>7} {'variant':>7} | {'fwd+bwd ms':>10} {'peak GiB':>9} | N*V*4 bytes = fp32 [N, V]")
    element_size = DTYPES[args.dtype].itemsize
    for vocab in args.vocabs:
        grads = (args.rows + vocab) * args.dim * element_size
        print(f"{vocab:>7} {'':>7} | (both peaks include the gradients dHidden + dW: {grads / 2**30:.2f} GiB)")
        hidden, weight, targets = make_inputs(args, vocab, device)
        results = {variant: gpu_measure(step_function(variant, args.entropy), hidden, weight, targets)
                   for variant in ("naive", "fused")}
        for variant, (ms, peak) in results.items():
            print(f"{vocab:>7} {variant:>7} | {ms:>10.2f} {peak / 2**30:>9.2f} | {args.rows * vocab * 4 / 2**30:.2f} GiB")
        (naive_ms, naive_peak), (fused_ms, fused_peak) = results["naive"], results["fused"]
        print(f"{vocab:>7} {'ratio':>7} | {fused_ms / naive_ms:>10.2f} {fused_peak / naive_peak:>9.3f} | fused / naive",
              flush=True)
        del hidden, weight, targets, results
        torch.cuda.empty_cache()


def gpu_measure(step, hidden, weight, targets):
    """(ms per step, peak bytes above the inputs) of one forward+backward step on the GPU."""
    import triton.testing

    step(hidden, weight, targets)  # compile / autotune outside the measurements
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step(hidden, weight, targets)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del grads
    ms = triton.testing.do_bench(lambda: step(hidden, weight, targets), warmup=25, rep=200)
    return ms, peak


# ---------------------------------------------------------------------------------------- CPU


def resident_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_worker(args, variant, vocab):
    """Runs in a fresh process: one peak-memory measurement, then timing."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    hidden, weight, targets = make_inputs(args, vocab, "cpu")
    step = step_function(variant, args.entropy)
    rss_before = resident_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss (upper bound on growth may be hidden by earlier peaks)"
    start = time.perf_counter()
    grads = step(hidden, weight, targets)
    first_seconds = time.perf_counter() - start
    if method == "VmHWM":
        peak_kib = resident_kib("VmHWM") - rss_before
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    del grads
    times = [first_seconds]
    for _ in range(args.reps - 1):
        start = time.perf_counter()
        step(hidden, weight, targets)
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(seconds=min(times), peak_bytes=peak_kib * 1024, method=method)))


def bench_cpu(args):
    print("No CUDA device: timing the PyTorch path of fused_linear_logprobs (chunked, recompute in backward)")
    print(f"against the naive path on CPU ({os.cpu_count()} cores), {args.dtype}, N={args.rows}, D={args.dim}, "
          f"entropy={args.entropy}; each variant in a fresh process; best of {args.reps}.")
    print(f"{'V':>7} {'variant':>7} | {'fwd+bwd s':>9} {'peak MiB':>9} | fp32 [N, V] = N*V*4 bytes")
    element_size = DTYPES[args.dtype].itemsize
    for vocab in args.vocabs:
        grads = (args.rows + vocab) * args.dim * element_size
        print(f"{vocab:>7} {'':>7} | (both peaks include the gradients dHidden + dW: {grads / 2**20:.1f} MiB)")
        results = {}
        for variant in ("naive", "fused"):
            command = [sys.executable, os.path.abspath(__file__), "--worker", variant, str(vocab),
                       "--rows", str(args.rows), "--dim", str(args.dim), "--dtype", args.dtype, "--reps", str(args.reps)]
            if args.entropy:
                command.append("--entropy")
            env = dict(os.environ)
            env.pop("TRITON_INTERPRET", None)
            output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            results[variant] = result
            print(f"{vocab:>7} {variant:>7} | {result['seconds']:>9.3f} {result['peak_bytes'] / 2**20:>9.1f} | "
                  f"{args.rows * vocab * 4 / 2**20:.1f} MiB", flush=True)
        naive, fused = results["naive"], results["fused"]
        print(f"{vocab:>7} {'ratio':>7} | {fused['seconds'] / naive['seconds']:>9.2f} "
              f"{fused['peak_bytes'] / naive['peak_bytes']:>9.3f} | fused / naive   (peak via {fused['method']})")


def main():
    args = parse_args()
    if args.worker:
        variant, vocab = args.worker
        cpu_worker(args, variant, int(vocab))
    elif ON_GPU:
        bench_gpu(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
