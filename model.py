"""A hand-written LLaMA for Safe RLHF: one body, two heads.

    Transformer(args, head="lm")      tok_embeddings -> n_layers x TransformerBlock -> norm -> output
    Transformer(args, head="score")   ... -> norm -> score_head: Linear(dim, 1), one score per position

The LM head is the policy (SFT model, actor, reference); the score head is the reward model, the
cost model and both critics (../shared/SAFE_RLHF.md). Names follow Meta's llama `model.py`
(`wq wk wv wo`, `w1 w2 w3`, `attention_norm`, `ffn_norm`). This module knows nothing of disk:
hf_io.py loads and saves Hugging Face-format checkpoints, and the Hugging Face names exist only there.
RoPE uses the Hugging Face ("rotate half") layout, so HF checkpoints load without permuting wq/wk.

Padding: a batch row may be left-padded (prompts), right-padded (training batches), or both
(generated sequences: left-padded prompt, response, EOS, pads). Positions come from the attention
mask, and keys before a row's first real token are masked through `kv_start`; keys after its last
real token are never seen by real tokens thanks to causality, so no other mask is needed. The
forward pass (and generate(), for its prefill and all its decoding steps) wraps kv_start once in a
`rlhf_kernels.AttentionMask` and hands that to every block, so that what attention derives from it
(SDPA masks, the check for rows that see no key) is built once, not once per layer.

Attention and log-prob math go through `rlhf_kernels.flash_attention` and `rlhf_kernels.fused_linear_logprobs`
only: those choose between the Triton kernels and a PyTorch path.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from rlhf_kernels import AttentionMask, flash_attention, fused_linear_logprobs, static_cache_attention


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ModelArgs:
    dim: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    vocab_size: int = 1024  # rows of tok_embeddings and output
    hidden_dim: int | None = None  # SwiGLU width; None = LLaMA's rule (8/3 dim, rounded up)
    multiple_of: int = 32  # rounding for the hidden_dim rule
    head_dim: int | None = None  # None = dim // n_heads
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # Llama-3.1 style: {"rope_type": "llama3", "factor", ...}
    max_seq_len: int = 2048  # longest sequence the model is meant for (HF max_position_embeddings)
    tie_embeddings: bool = False  # output shares tok_embeddings' weight
    qkv_bias: bool = False  # biases on wq, wk, wv (Qwen2)
    sliding_window: int | None = None  # a query sees at most this many keys, itself included (Mistral v0.1)
    family: str = "llama"  # llama | mistral | qwen2: the Hugging Face architecture written on save

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Named shapes. "tiny" is the CPU default of the embedded task (~1M parameters with vocab 1024).
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=352, max_seq_len=256),
    "small": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=1024, hidden_dim=704, max_seq_len=512),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                         norm_eps=1e-5, rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True),  # 1B-class benches
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, norm_eps=1e-6, max_seq_len=2048),
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, norm_eps=1e-5, max_seq_len=4096),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                       norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                         norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


# ----------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same math
        # Normalise in fp32, multiply by the weight in the input dtype: the order HF uses, so
        # bf16 results match it too.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(args: ModelArgs, device) -> torch.Tensor:
    """Inverse frequencies of RoPE, [head_dim / 2], fp32, with optional Llama-3 scaling."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = args.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, a smooth blend between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope_scaling {scaling}; supported: llama3")
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos and a signed sin, [B, T, 1, head_dim], for integer positions [B, T]. The sign of the
    first half of sin is folded in here once, instead of negating x in every layer."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2], fp32 like HF
    sin = freqs.sin()
    cos = torch.cat((freqs, freqs), dim=-1).cos()
    return cos[:, :, None, :].to(dtype), torch.cat((-sin, sin), dim=-1)[:, :, None, :].to(dtype)


def apply_rope(x, cos, signed_sin):
    """HF's rotate-half RoPE: x cos + (-x2, x1) sin, written as x cos + (x2, x1) signed_sin.

    Returns x's dtype: under autocast the projections are bf16 while cos/sin follow the fp32
    residual stream, and q, k must stay in v's dtype (one KV-cache dtype, one kernel dtype)."""
    half = x.shape[-1] // 2
    return (x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values of one layer, [B, max_len, n_kv_heads, head_dim].

    Allocated on first write, in the dtype of the keys (the compute dtype, which under FSDP mixed
    precision differs from the parameters' dtype)."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k = self.v = None

    def update(self, start, k, v):
        """Write k, v [B, T, Hkv, D] at `start` and return the keys and values to attend over: those
        up to the last one written, or, when `start` is a tensor (one index, the static decoding
        step), the whole cache, so that the shapes never change."""
        if self.k is None:
            shape = (self.batch, self.max_len, k.shape[2], k.shape[3])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        if isinstance(start, torch.Tensor):
            return self.k.index_copy_(1, start, k), self.v.index_copy_(1, start, v)
        end = start + k.shape[1]
        self.k.narrow(1, start, k.shape[1]).copy_(k)  # narrow: cheaper per token than slice indexing
        self.v.narrow(1, start, v.shape[1]).copy_(v)
        return self.k.narrow(1, 0, end), self.v.narrow(1, 0, end)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.sliding_window = args.sliding_window
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask | torch.Tensor, cache: KVCache | None = None,
                cache_pos: int | torch.Tensor = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if T == 1:  # decoding: q and k rotated as one tensor, the same elementwise math in half the ops
            q, k = apply_rope(torch.cat((q, k), 2), cos, sin).split((self.n_heads, self.n_kv_heads), 2)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_pos, k, v)
        # K/V keep n_kv_heads heads: the kernel reads each group's shared head, no repeat in memory.
        if isinstance(mask, torch.Tensor):  # StaticDecodeStep: the whole cache, an additive bias says which keys
            out = static_cache_attention(q, k, v, mask)
        else:
            out = flash_attention(q, k, v, causal=True, mask=mask, window=self.sliding_window)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class ScoreHead(nn.Linear):
    """Linear(dim, 1) with a bias: one scalar per position (reward, cost or value)."""

    def __init__(self, dim: int):
        super().__init__(dim, 1, bias=True)


# ----------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.args, self.head = args, head
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if head == "lm":
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight
        else:
            self.score_head = ScoreHead(args.dim)
        # Running statistics of end scores, saved with score models (SAFE_RLHF.md); not applied in forward.
        self.score_stats: dict | None = None
        # Recompute each block in backward instead of storing its activations (set by the trainer).
        self.activation_checkpointing = False

    # -- initialisation -------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Fill every parameter: normal(0, std) for matrices, with the residual projections (wo, w2)
        scaled by 1/sqrt(2 n_layers) as in GPT-2, ones for norms, zeros for biases.

        Call after `to_empty()` when the model was built on the meta device."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):  # the score head's and Qwen2's q/k/v biases
                p.zero_()
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, residual_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)

    @torch.no_grad()
    def reset_score_head(self, std: float = 0.02, seed: int | None = None):
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.score_head.weight.device).manual_seed(seed)
        self.score_head.weight.normal_(0.0, std, generator=gen)
        self.score_head.bias.zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, *, targets=None, temperature: float = 1.0,
                return_entropy: bool = False):
        """LM head: logits [B, T, V]; or, with `targets` [B, T], the fp32 log-probs [B, T] of those
        tokens under softmax(logits / temperature) computed straight from the hidden states in
        vocabulary tiles (and the entropy [B, T] if asked): the [B, T, V] logits never exist.
        Score head: fp32 scores [B, T].

        Log-probs live inside forward (not a separate method) so that FSDP's hooks gather the
        output weight for them."""
        h = self.hidden_states(input_ids, attention_mask)
        if self.head == "score":
            return self.score_head(h).squeeze(-1).float()
        if targets is None:
            return self.output(h)
        B, T, D = h.shape
        out = fused_linear_logprobs(h.reshape(B * T, D), self.output.weight, targets.reshape(B * T),
                                    temperature=temperature, return_entropy=return_entropy)
        if return_entropy:
            return out[0].view(B, T), out[1].view(B, T)
        return out.view(B, T)

    def hidden_states(self, input_ids, attention_mask=None):
        positions, kv_start = positions_from_mask(input_ids, attention_mask)
        mask = AttentionMask(kv_start)
        x = self.tok_embeddings(input_ids)
        cos, sin = rope_cos_sin(rope_inv_freq(self.args, x.device), positions, x.dtype)
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def _forward_cached(self, tokens, cos_sin, mask, caches, cache_pos):
        """Logits [B, V] of the last position, reading and extending the KV caches. cos_sin: the
        tokens' rope_cos_sin in fp32, cast here as rope_cos_sin would round them for x's dtype.
        mask: one AttentionMask for the prefill and every decoding step, with the caches' length
        as its capacity."""
        x = self.tok_embeddings(tokens)
        cos, sin = cos_sin[0].to(x.dtype), cos_sin[1].to(x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, mask, cache, cache_pos)
        return self.output(self.norm(x[:, -1]))

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                 generator: torch.Generator | None = None, check_every: int = 8,
                 noise_rows: tuple[int, int] | None = None, decode: str = "auto"):
        """Sample continuations of left-padded prompts [B, T]; returns [B, T + max_new_tokens].

        One prefill over the prompts, then one token per step through a preallocated KV cache.
        Each row is padded with `pad_id` after its EOS (eos_id: one id, or several: Llama-3 ends a
        turn with <|eot_id|> and a text with <|end_of_text|>). Temperature 0 is greedy. The sampler is
        sync-free (Gumbel-max instead of torch.multinomial); whether every row has finished
        is checked every `check_every` steps, the only host-device sync of the loop.

        noise_rows=(offset, total): these B prompts are rows offset..offset+B of a larger batch of
        `total` split over ranks or chunks; the sampling noise is drawn for all `total` rows and
        sliced, so a row's sample does not depend on how the batch was split (pass a generator
        seeded identically for every part).

        decode: how each token after the first is computed (the same tokens in fp32; in bf16 the
        attention over the whole cache may round differently from the eager step's):
          "eager"   attention reads the cache up to the current token (the fewest FLOPs);
          "static"  StaticDecodeStep: the same shapes at every step (the whole cache, a mask);
          "graph"   that step captured once as a CUDA graph and replayed (CUDA; a step's dozens of
                    small kernels cost one launch; the static step's tokens, bit for bit);
          "auto"    "graph" on CUDA when the parameters are whole (a plain module, or FSDP inside
                    training.gathered), else "eager": on a CPU there is no launch latency to save,
                    and the static step reads the whole cache."""
        if self.head != "lm":
            raise ValueError("generate() needs the LM head")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        B, T = input_ids.shape
        total = T + max_new_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask[:, -1].min() == 0:
            raise ValueError("generate() expects left-padded prompts: the last column of attention_mask has a 0")
        out = torch.full((B, total), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        out[:, :T] = input_ids
        # The loop runs in inference mode: no version counters or view tracking on its ~40 small ops
        # per block and token (about a tenth of a CPU decoding step), the same values. Its tensors
        # cannot enter autograd, so the one it returns is allocated out here and filled in place.
        # Not while FSDP shards the parameters: the blocks would all-gather them in here, into
        # buffers that the next training step reuses. (Not inference_mode(False): that turns grad on.)
        sharded = _sharded(self)
        with contextlib.nullcontext() if sharded else torch.inference_mode():
            positions, kv_start = positions_from_mask(input_ids, attention_mask)
            mask = AttentionMask(kv_start, capacity=total)
            caches = [KVCache(B, total) for _ in self.layers]
            next_pos = positions[:, -1:] + 1  # position of the first new token of each row
            finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)

            inv_freq = rope_inv_freq(self.args, input_ids.device)
            logits = self._forward_cached(input_ids, rope_cos_sin(inv_freq, positions, torch.float32), mask, caches, 0)
            # RoPE of every decoding step at once, [B, steps, 1, head_dim], sliced per step: elementwise
            # math, so the same values as computing them step by step, without ~7 small ops per token.
            steps = torch.arange(max(max_new_tokens - 1, 0), device=input_ids.device)
            cos, sin = rope_cos_sin(inv_freq, next_pos + steps, torch.float32)
            if eos_id is not None and not isinstance(eos_id, int):  # several: one device tensor, not one per step
                eos_ids = torch.tensor(list(eos_id), dtype=input_ids.dtype, device=input_ids.device)
            else:
                eos_ids = eos_id
            chosen = decode
            if decode == "auto":
                decode = "graph" if input_ids.is_cuda and not sharded else "eager"
            if decode != "eager" and max_new_tokens > 1:
                try:
                    static_step = StaticDecodeStep(self, caches, mask.kv_start, T, cos, sin, graph=decode == "graph")
                except RuntimeError as e:  # a capture CUDA refused: "auto" falls back to the eager step
                    if chosen != "auto":
                        raise
                    warnings.warn(f"generate(): CUDA graph capture failed ({e}); decoding with the eager step")
                    decode = "eager"
            for step in range(max_new_tokens):
                token = sample_token(logits.float(), temperature, top_p, generator, noise_rows)
                if eos_id is not None:  # (without one, no row ever finishes)
                    token.masked_fill_(finished, pad_id)
                    finished |= is_eos(token, eos_ids)
                out.select(1, T + step).copy_(token)
                if eos_id is not None and (step + 1) % check_every == 0 and bool(finished.all()):
                    break
                if step + 1 == max_new_tokens:
                    break
                if decode == "eager":
                    logits = self._forward_cached(token[:, None], (cos[:, step:step + 1], sin[:, step:step + 1]),
                                                  mask, caches, T + step)
                else:
                    logits = static_step(token, step)
            return out


DECODE_MODES = ("auto", "eager", "static", "graph")


def _sharded(model) -> bool:
    """True while some parameter is an FSDP shard (a DTensor), i.e. outside training.gathered()."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


class StaticDecodeStep:
    """generate()'s decoding step with the same shapes at every step, gpt-fast style, so that it
    can be captured once as a CUDA graph and replayed: on a GPU, a small model's step is dozens of
    short kernels whose launch latency, not their work, sets the pace.

    Everything that changes from one token to the next lives in preallocated buffers: the token,
    and the step index as a tensor (the cache slot written, the RoPE row read). Each layer writes its
    key and value into that slot and attends over the whole cache through an additive bias that
    hides the slots not yet written, the left padding and, for Mistral, keys outside the window.
    The math is the eager step's; only masked keys are added (each contributes exactly 0).

    Blocks are called through .forward: with the parameters whole (a plain module, or FSDP inside
    training.gathered), FSDP's hooks have nothing to do, and they must not run inside a capture."""

    def __init__(self, model: "Transformer", caches: list, kv_start, first_pos: int, cos, sin, *, graph: bool):
        if _sharded(model):
            raise ValueError("a static decoding step needs whole parameters: under FSDP, generate inside "
                             "training.gathered(model), or pass decode='eager'")
        if graph and not cos.is_cuda:
            raise ValueError("decode='graph' captures a CUDA graph: it needs a CUDA device")
        device = cos.device
        self.model, self.caches, self.cos, self.sin = model, caches, cos, sin
        capacity = caches[0].k.shape[1]
        self.token = torch.zeros(caches[0].k.shape[0], 1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.first_pos = first_pos  # cache slot of step 0's token
        self.slots = torch.arange(capacity, device=device)
        self.kv_start = (kv_start if kv_start is not None else torch.zeros(1, dtype=torch.long, device=device))[:, None]
        self.window = model.args.sliding_window
        self.graph = self.logits = None
        if graph:
            self._capture()

    def _forward(self):
        """Logits [B, V] of the token in self.token at step self.step: the traced function."""
        model = self.model
        slot = self.step + self.first_pos
        visible = (self.slots <= slot) & (self.slots >= self.kv_start)  # [B or 1, capacity]
        if self.window is not None:
            visible &= self.slots > slot - self.window
        x = model.tok_embeddings(self.token)
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
        bias = bias.expand(self.token.shape[0], -1)[:, None, None, :]
        cos, sin = self.cos.index_select(1, self.step).to(x.dtype), self.sin.index_select(1, self.step).to(x.dtype)
        for layer, cache in zip(model.layers, self.caches):
            x = layer.forward(x, cos, sin, bias, cache, slot)
        return model.output(model.norm(x[:, -1]))

    def _capture(self):
        # Warm up on a side stream (allocator pools, kernel choices), then capture. Both write step
        # 0's slot, which step 0 itself rewrites before anything reads it. Autocast's weight cache
        # must be off while capturing (its casts would be recorded once and freed).
        device = self.cos.device
        autocast = torch.is_autocast_enabled("cuda")
        context = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                   if autocast else contextlib.nullcontext())
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), context:
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), context:
            self.logits = self._forward()

    def __call__(self, token, step: int):
        self.token.copy_(token[:, None])
        self.step.fill_(step)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


# ----------------------------------------------------------------------------------------------
# Padding, sampling and score helpers

def positions_from_mask(input_ids, attention_mask):
    """RoPE positions [B, T] and the first real key of each row, kv_start [B].

    A row's real tokens must be contiguous (left padding, right padding, or both)."""
    B, T = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return positions, None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.long()
    seen = mask.cumsum(-1)
    kv_start = (seen == 0).sum(-1)
    last = T - (mask.flip(-1).cumsum(-1) == 0).sum(-1)  # one past the last real token
    if not torch.compiler.is_compiling():
        # One host sync for two checks: a hole in the mask is an error, and without left padding
        # (training batches are right-padded) the attention needs no key mask at all.
        hole = ((last - kv_start != seen[:, -1]) & (seen[:, -1] > 0)).any()
        hole, left_padded = torch.stack([hole, kv_start.any()]).tolist()
        if hole:
            raise ValueError("attention_mask has a hole: each row's ones must be contiguous (left and/or right padding)")
        if not left_padded:
            kv_start = None
    return (seen - 1).clamp(min=0), kv_start


def sample_token(logits, temperature: float, top_p: float, generator=None, noise_rows=None):
    """Next token [B] from fp32 logits [B, V]: greedy at temperature 0, else nucleus sampling
    (noise_rows: see Transformer.generate)."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens before it already hold top_p of the mass (the top one always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Gumbel-max: argmax(logits + G), G = -log(-log U), draws from softmax(logits) without the
    # host-device sync of torch.multinomial (and a uniform draw is cheaper than an exponential one).
    if noise_rows is None:
        uniform = torch.empty_like(logits).uniform_(generator=generator)
    else:
        offset, total = noise_rows
        uniform = torch.empty((total, logits.shape[1]), dtype=logits.dtype, device=logits.device)
        uniform = uniform.uniform_(generator=generator)[offset:offset + logits.shape[0]]
    gumbel_neg = uniform.log_().neg_().log_()  # log(-log U) = -G, in place: one buffer, not three
    return torch.sub(logits, gumbel_neg, out=gumbel_neg).argmax(-1)


def is_eos(tokens, eos_id: int | Sequence[int] | torch.Tensor):
    """Boolean mask of the tokens that are an EOS id (one id, or any of several)."""
    if isinstance(eos_id, int):
        return tokens == eos_id
    if isinstance(eos_id, torch.Tensor):
        return torch.isin(tokens, eos_id)
    if len(eos_id) == 1:
        return tokens == eos_id[0]
    return torch.isin(tokens, torch.tensor(list(eos_id), dtype=tokens.dtype, device=tokens.device))


def generation_mask(sequences, prompt_mask, eos_id: int | Sequence[int] | None):
    """Attention mask [B, T + N] of generate()'s output: the prompt's mask, then 1 on each response
    token up to and including the row's first EOS, 0 after it. Rows without an EOS (cut at
    max_new_tokens) keep all N tokens."""
    T = prompt_mask.shape[1]
    response = sequences[:, T:]
    if eos_id is None:
        keep = torch.ones_like(response, dtype=prompt_mask.dtype)
    else:
        eos = is_eos(response, eos_id).long()
        keep = ((eos.cumsum(-1) - eos) == 0).to(prompt_mask.dtype)  # before or at the first EOS
    return torch.cat([prompt_mask, keep], 1)


def end_scores(scores, attention_mask):
    """Score at each row's last real token [B] (the EOS of prompt + response + eos)."""
    T = attention_mask.shape[1]
    last = T - 1 - (attention_mask.long().flip(-1).cumsum(-1) == 0).sum(-1)
    return scores.gather(1, last.clamp(min=0)[:, None]).squeeze(1)
