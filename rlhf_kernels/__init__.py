"""Fused kernels for the two hot spots of RLHF training: attention and token log-probs.

Entry points (the rest of the project calls only these):

    flash_attention(q, k, v, *, causal=True, kv_start=None, softmax_scale=None, window=None, mask=None)
    AttentionMask(kv_start, capacity=None)     # built once per forward, passed as `mask` to every layer
    static_cache_attention(q, k, v, bias)      # one query over a whole static KV cache (static decoding)
    logprobs_from_logits(logits, targets, temperature=1.0)
    fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False)

Each has a Triton implementation (`*_triton`) and a plain PyTorch one (`*_torch`)
computing the same function; `use_triton` below is the one place that picks:

* CUDA tensors run the Triton kernels;
* CPU tensors run the Triton kernels through Triton's interpreter when
  TRITON_INTERPRET=1 (slow; for testing the kernels without a GPU). The variable
  must be set before the first `import rlhf_kernels`: Triton decides between compiling
  and interpreting when the kernels are defined;
* anything else, or Triton not installed, runs the PyTorch path;
* KERNELS=torch in the environment forces the PyTorch path everywhere
  (debugging), KERNELS=triton forces the Triton kernels.

Attention head dims other than 16, 32, 64 and 128 run the PyTorch path unless
KERNELS=triton forces the kernel (which then refuses them).

Under torch.autocast the entry points cast their floating inputs to the autocast
dtype, as autocast does for the matmuls and SDPA they replace: autocast never
casts the inputs of a custom autograd Function, and a mixed-precision forward
hands them mixed dtypes (bf16 projections, fp32 residual stream and norms).
"""

import os

import torch

from .attention import (TRITON_AVAILABLE, AttentionMask, flash_attention_torch, sliding_window_attention_torch,
                        static_cache_attention_torch)
from .logprob import fused_linear_logprobs_torch, logprobs_from_logits_torch

if TRITON_AVAILABLE:
    from .attention import flash_attention_triton
    from .logprob import fused_linear_logprobs_triton, logprobs_from_logits_triton
    from .triton_common import INTERPRETED as TRITON_INTERPRETED  # fixed when the kernels were defined
else:
    TRITON_INTERPRETED = False

    def _triton_missing(*args, **kwargs):
        raise ImportError("triton is not installed; use the *_torch functions or KERNELS=torch")

    flash_attention_triton = fused_linear_logprobs_triton = logprobs_from_logits_triton = _triton_missing


def use_triton(tensor):
    """True if the Triton kernels should handle this tensor (the one dispatch switch)."""
    forced = os.environ.get("KERNELS", "auto").lower()
    if forced == "torch" or not TRITON_AVAILABLE:
        return False
    if forced == "triton":
        return True
    if tensor.is_cuda:
        return True
    interpret_requested = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return tensor.device.type == "cpu" and interpret_requested and TRITON_INTERPRETED


def _autocast_inputs(*tensors):
    """The tensors in the autocast dtype when torch.autocast is on for their device, else unchanged."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


TRITON_HEAD_DIMS = (16, 32, 64, 128)


def flash_attention(q, k, v, *, causal=True, kv_start=None, softmax_scale=None, window=None, mask=None):
    """Softmax attention, q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> [B, Tq, Hq, D]. See rlhf_kernels/attention.py.

    mask: an AttentionMask shared by every layer of a forward pass, in place of kv_start (without
    one, the call builds its own from kv_start).

    window (Mistral's sliding window): a query sees at most `window` keys, itself included. Only
    the PyTorch path has it; while every sequence fits in the window it changes nothing and the
    usual dispatch applies."""
    q, k, v = _autocast_inputs(q, k, v)
    mask = AttentionMask.from_args(kv_start, mask)
    if window is not None and k.shape[1] > window:
        return sliding_window_attention_torch(q, k, v, window=window, softmax_scale=softmax_scale, mask=mask)
    head_dim_ok = q.shape[-1] in TRITON_HEAD_DIMS or os.environ.get("KERNELS", "").lower() == "triton"
    if use_triton(q) and head_dim_ok:
        return flash_attention_triton(q, k, v, causal=causal, kv_start=mask.kv_start, softmax_scale=softmax_scale)
    return flash_attention_torch(q, k, v, causal=causal, softmax_scale=softmax_scale, mask=mask)


def static_cache_attention(q, k, v, bias, *, softmax_scale=None):
    """One query per row over a whole preallocated KV cache, through an additive bias (the static
    decoding step's attention; PyTorch's SDPA on every device). See rlhf_kernels/attention.py."""
    q, k, v = _autocast_inputs(q, k, v)
    return static_cache_attention_torch(q, k, v, bias.to(q.dtype), softmax_scale=softmax_scale)


def logprobs_from_logits(logits, targets, temperature=1.0):
    """fp32 log p(targets) under softmax(logits / temperature). See rlhf_kernels/logprob.py."""
    impl = logprobs_from_logits_triton if use_triton(logits) else logprobs_from_logits_torch
    return impl(logits, targets, temperature)


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """fp32 log p(targets) (and entropy) of softmax(hidden @ weight.T / temperature). See rlhf_kernels/logprob.py."""
    hidden, weight = _autocast_inputs(hidden, weight)
    impl = fused_linear_logprobs_triton if use_triton(hidden) else fused_linear_logprobs_torch
    return impl(hidden, weight, targets, temperature, return_entropy)


__all__ = [
    "TRITON_AVAILABLE",
    "TRITON_INTERPRETED",
    "use_triton",
    "AttentionMask",
    "flash_attention",
    "flash_attention_torch",
    "flash_attention_triton",
    "static_cache_attention",
    "logprobs_from_logits",
    "logprobs_from_logits_torch",
    "logprobs_from_logits_triton",
    "fused_linear_logprobs",
    "fused_linear_logprobs_torch",
    "fused_linear_logprobs_triton",
]
