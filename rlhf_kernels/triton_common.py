"""What the Triton kernels of attention.py and logprob.py share: autotuning, launching, and the
precision of tl.dot. Imported only where Triton is installed."""

import os

import torch
import triton

# Fixed when the kernels are defined: Triton decides then between compiling and interpreting
# (TRITON_INTERPRET=1 must be set before the first import of triton).
INTERPRETED = bool(triton.knobs.runtime.interpret)


def autotune(configs, key):
    """triton.autotune on a GPU (KERNELS_AUTOTUNE=0: the first config only, to test quickly);
    identity under the interpreter, where each launch fixes small blocks instead (see `launcher`)."""
    if INTERPRETED:
        return lambda kernel: kernel
    if os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key)


# Fused multiply-adds, said explicitly: Triton 3.9 warns at every compile that its default (on) turns
# off in 3.10, which would change the kernels' rounding and speed with the Triton version installed.
FP_FUSION = dict(enable_fp_fusion=True)


def launcher(interpreter_blocks: dict):
    """launch(kernel, grid, args, name, **constexprs): under the interpreter the block sizes come
    from interpreter_blocks[name] (autotuning is off there); on a GPU the autotuner picks them."""
    def launch(kernel, grid, args, name, **constexprs):
        if INTERPRETED:
            constexprs.update(interpreter_blocks[name])
        kernel[grid](*args, **constexprs, **FP_FUSION)
    return launch


def dot_precision(dtype) -> str:
    """tl.dot's input_precision: fp32 inputs follow torch's own matmul setting (TF32 only if
    allowed); the flag is ignored for fp16/bf16."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
