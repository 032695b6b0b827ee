"""Compile every Triton kernel for a GPU on a machine without one, and report each compiled variant's
registers, spills and shared memory against the GPU's limits.

    python bench/compile_kernels.py                           # sm_90 (H100/H200), every autotune config, bf16
    python bench/compile_kernels.py --dtypes bfloat16,float16,float32 --head-dims 64,128
    python bench/compile_kernels.py --arch 80                 # A100
    python bench/compile_kernels.py --first-config --causal-only   # what tests/test_compile_kernels.py runs

Lent GPUs are rare and short, and they carry their own Triton (3.6 when last read, where CI pins 3.9):
a kernel that does not compile with that Triton, or an autotune config that needs more shared memory
than the GPU has, would only show there. Triton compiles to a cubin with nothing but its own ptxas,
so this script does it here. A stand-in driver tells Triton the target GPU; the kernels' launches
compile instead of running (every autotune config of each launch, or with --first-config only the
first, which is what KERNELS_AUTOTUNE=0 runs); and the kernels are reached through their real entry
points (flash_attention_triton forward and backward, logprobs_from_logits_triton,
fused_linear_logprobs_triton with and without the entropy's gradient), so that the arguments,
strides and constexprs are the ones a GPU run passes. The tensors are CPU tensors, and nothing reads
what the kernels would have written. Triton's interpreter, which the other CPU tests run, compiles
nothing: neither the GPU compiler's checks nor its register and shared-memory budgets are seen there.

Per compiled variant: registers per thread, the stack frame per thread (spilled registers), and the
dynamic shared memory against the architecture's per-block limit. Exit status 1 if a kernel fails
to compile or a variant needs more shared memory than the GPU has (on the GPU the autotuner would
skip that config, and KERNELS_AUTOTUNE=0, which takes the first config only, would fail). A compile
takes seconds to a minute on a CPU (fp32 kernels the longest); Triton's cache keeps each one.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Per-block dynamic shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes,
# and the SM count that fused_linear_logprobs sizes its vocabulary splits by.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
NUM_SMS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="CUDA compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated input dtypes (bfloat16, float16, float32)")
    parser.add_argument("--head-dims", default="128", help="comma-separated attention head dims (16, 32, 64, 128)")
    parser.add_argument("--first-config", action="store_true",
                        help="each autotuned kernel's first config only (what KERNELS_AUTOTUNE=0 runs)")
    parser.add_argument("--causal-only", action="store_true", help="attention: causal only (every stage's case)")
    parser.add_argument("--json", default=None, help="write every variant's numbers to this file")
    args = parser.parse_args(argv)
    for name in args.dtypes.split(","):
        if name not in ("bfloat16", "float16", "float32"):
            parser.error(f"--dtypes: {name!r} is not one of bfloat16, float16, float32")
    for dim in args.head_dims.split(","):
        if dim not in ("16", "32", "64", "128"):
            parser.error(f"--head-dims: {dim!r} is not one of 16, 32, 64, 128 (the attention kernel's)")
    return args


@contextlib.contextmanager
def offline_compilation(arch: int, first_config: bool = False):
    """Inside: every Triton launch compiles for sm_<arch> and launches nothing. Yields (compiled,
    failures): dicts of the variants compiled (kernel, config, compiled kernel) and of those that
    failed (kernel, config, error), filled as launches happen."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if triton.knobs.runtime.interpret:  # TRITON_INTERPRET, as Triton reads it
        raise RuntimeError("offline compilation compiles for a GPU: unset TRITON_INTERPRET (the interpreter compiles nothing)")

    class OfflineDriver:
        """Stands in for Triton's CUDA driver: reports the target GPU, so that launches compile for it."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled, failures = [], []
    plain_run, plain_autotuner_run = JITFunction.run, Autotuner.run
    plain_properties = torch.cuda.get_device_properties

    def config_text(kwargs) -> str:
        shown = {k: v for k, v in kwargs.items() if k != "debug" and not isinstance(v, torch.Tensor)}
        return " ".join(f"{k}={v}" for k, v in sorted(shown.items()))

    def compile_only(self, *args, grid, warmup, **kwargs):
        try:
            kernel = plain_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - every compile error is reported; the caller decides
            failures.append(dict(kernel=self.fn.__name__, config=config_text(kwargs),
                                 error=f"{type(e).__name__}: {str(e).strip()[:3000]}"))
            return None
        compiled.append(dict(kernel=self.fn.__name__, config=config_text(kwargs), compiled=kernel))
        return kernel

    def compile_configs(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        for config in self.configs[:1] if first_config else self.configs:
            self.fn.run(*args, warmup=True, **kwargs, **config.all_kwargs())

    previous_driver = driver._active  # None until something asked: reset_active() would ask for a GPU
    driver.set_active(OfflineDriver())
    JITFunction.run, Autotuner.run = compile_only, compile_configs
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=NUM_SMS.get(arch, 132))
    try:
        yield compiled, failures
    finally:
        JITFunction.run, Autotuner.run = plain_run, plain_autotuner_run
        torch.cuda.get_device_properties = plain_properties
        driver._active = previous_driver


def resources(cubin: bytes) -> dict:
    """Registers and stack frame per thread of a cubin's kernel, as cuobjdump (shipped with Triton) reads them."""
    import triton

    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except RuntimeError:  # not shipped with this Triton, nor named by TRITON_CUOBJDUMP_PATH
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return dict(registers=found.get("REG"), stack=max(found.get("STACK", 0), found.get("LOCAL", 0)))


def exercise(dtype, head_dims, causal_only: bool):
    """Every kernel through its entry point, forward and backward (the attention with left padding and
    grouped-query heads, as sampling and training run it)."""
    import torch

    os.environ["KERNELS"] = "triton"
    sys.path.insert(0, str(ROOT))
    from rlhf_kernels import flash_attention_triton, fused_linear_logprobs_triton, logprobs_from_logits_triton

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)

    for head_dim in head_dims:
        for causal in (True,) if causal_only else (True, False):
            q, k, v = rand(2, 256, 8, head_dim), rand(2, 256, 2, head_dim), rand(2, 256, 2, head_dim)
            out = flash_attention_triton(q, k, v, causal=causal, kv_start=torch.tensor([0, 17]))
            out.backward(torch.randn(out.shape, generator=gen).to(dtype))
    logits = rand(64, 4096)
    logprobs_from_logits_triton(logits, torch.randint(0, 4096, (64,), generator=gen)).sum().backward()
    hidden, weight = rand(512, 256), rand(4096, 256)
    targets = torch.randint(0, 4096, (512,), generator=gen)
    logp, entropy = fused_linear_logprobs_triton(hidden, weight, targets, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()  # both upstream gradients (PPO's entropy bonus)
    fused_linear_logprobs_triton(hidden, weight, targets).sum().backward()  # the log-probs' only


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("KERNELS_AUTOTUNE", None)  # the autotuner's configs are what --first-config chooses from
    import torch
    import triton

    limit = SHARED_LIMIT.get(args.arch)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch} (dynamic shared memory "
          f"per block: {limit} bytes); {'first autotune config' if args.first_config else 'every autotune config'}",
          flush=True)
    start = time.perf_counter()
    rows = []
    with offline_compilation(args.arch, args.first_config) as (compiled, failures):
        for name in args.dtypes.split(","):
            before = len(compiled)
            exercise(getattr(torch, name), [int(d) for d in args.head_dims.split(",")], args.causal_only)
            seen = set()
            for entry in compiled[before:]:
                if (entry["kernel"], entry["config"]) in seen:  # the same variant launched again (Triton's cache)
                    continue
                seen.add((entry["kernel"], entry["config"]))
                kernel = entry["compiled"]
                rows.append(dict(kernel=entry["kernel"], dtype=name, config=entry["config"],
                                 shared=kernel.metadata.shared, **resources(kernel.asm["cubin"])))
    seconds = time.perf_counter() - start

    over = [row for row in rows if limit is not None and row["shared"] > limit]
    print(f"{'kernel':34} {'dtype':9} {'regs':>4} {'stack':>5} {'shared':>7}  config")
    for row in rows:
        print(f"{row['kernel']:34} {row['dtype']:9} {row.get('registers', '?'):>4} {row.get('stack', '?'):>5} "
              f"{row['shared']:>7}  {row['config']}" + ("  <-- more shared memory than a block has" if row in over else ""))
    spilling = sum(1 for row in rows if row.get("stack"))
    print(f"{len(rows)} variants compiled in {seconds:.0f} s: {spilling} spill registers to the stack, {len(over)} need "
          f"more shared memory than sm_{args.arch} has, {len(failures)} failed to compile")
    for failure in failures:
        print(f"FAILED {failure['kernel']} [{failure['config']}]:\n{failure['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch, shared_limit=limit,
                                                   rows=rows, failures=failures), indent=1))
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())
