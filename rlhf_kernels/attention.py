"""Attention: one entry point for prefill, chunked prefill and KV-cache decode.

    out = flash_attention(q, k, v, causal=True, kv_start=None, softmax_scale=None)
    out = flash_attention(q, k, v, causal=True, mask=AttentionMask(kv_start))

q is [B, Tq, Hq, D]; k and v are [B, Tk, Hkv, D] with Hq a multiple of Hkv
(grouped-query attention: query head h reads kv head h // (Hq // Hkv); K and V
are never repeated in memory). Tq <= Tk and query i sits at absolute position
Tk - Tq + i ("bottom-right" causal alignment), so the same call serves a full
prompt (Tq == Tk), a chunk of a prompt appended to a cache, and one-token
decoding (Tq == 1). kv_start[b] masks the keys at positions < kv_start[b]
(left padding). A query row that can see no key at all returns 0 and gets a
zero gradient, never NaN.

Every layer of a forward pass asks the same question of the same kv_start, so
the model builds one `AttentionMask` per forward (and one per generate() call)
and passes it as `mask` to every layer, as gpt-fast and Meta's llama build
their mask once in the model's forward. The PyTorch path keeps in it the SDPA
masks it derives from kv_start when the first layer asks, and the other layers
reuse them; the Triton kernels read kv_start only. A call given kv_start
instead builds its own AttentionMask. No module state: what a call computes
depends on its arguments only.

Two implementations compute the same function:

* `flash_attention_torch`: torch's scaled_dot_product_attention with an explicit
  mask (boolean; additive when decoding with left padding). Used on CPU and for
  debugging.
* `flash_attention_triton`: FlashAttention-2 style kernels. The forward walks
  over key blocks for one block of queries, keeping a running max and running
  sum of the softmax (the "online softmax"), so the [Tq, Tk] score matrix is
  never stored; it saves only the log-sum-exp per query row. The backward
  recomputes the probabilities block by block from that log-sum-exp: one kernel
  per key block accumulates dK and dV over every query head of its GQA group
  and every query block, another per query block accumulates dQ. Key blocks
  that lie entirely in the causal future (or entirely before kv_start) are
  skipped, and the position masks are only evaluated on blocks that straddle
  a boundary.

rlhf_kernels/__init__.py decides which one runs.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the PyTorch path still works
    TRITON_AVAILABLE = False


# --------------------------------------------------------------------------------------
# Plain PyTorch path
# --------------------------------------------------------------------------------------


def visible_keys_mask(batch, q_len, k_len, *, causal, kv_start, device):
    """Boolean [B or 1, 1, Tq, Tk] mask, True where query i may attend to key j.

    Returns None when every key is visible (non-causal, no left padding)."""
    if q_len == 1:
        causal = False  # bottom-right alignment: a single query is the last position and sees every key
    if not causal and kv_start is None:
        return None
    key_pos = torch.arange(k_len, device=device)
    query_pos = torch.arange(q_len, device=device) + (k_len - q_len)  # bottom-right alignment
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        visible = key_pos[None, :] <= query_pos[:, None]
    visible = visible[None, None]  # [1, 1, Tq, Tk]
    if kv_start is not None:
        not_padding = key_pos[None, :] >= kv_start.to(device=device, dtype=torch.long)[:, None]  # [B, Tk]
        visible = visible & not_padding[:, None, None, :]
    return visible


class AttentionMask:
    """Which keys the queries of one forward pass may see, shared by all its layers: the model
    builds one per forward (and one per generate() call, for its prefill and every decoding step)
    and hands it down to flash_attention.

    kv_start [B] (None: no left padding) is all the Triton kernels read. The PyTorch path derives
    SDPA masks from it when the first layer asks and keeps them here for the other layers, and for
    activation checkpointing's recomputation: every layer would build the same ones, and the host
    sync that checks for rows with no visible key would stall the pipeline once per layer.
    capacity: the longest key length decoding will reach (the KV cache's), so that the decoding
    mask is built once for every step of a generate() call.

    A plain class, not a dataclass: FSDP's input casting rebuilds dataclasses field by field at
    every block, which would throw away what the first block built."""

    def __init__(self, kv_start=None, *, capacity=None):
        self.kv_start = kv_start
        self.capacity = capacity
        self._masks = None  # (key, masks): what the latest layer asked for, and the next one will ask again
        self._decode = None  # (additive mask over >= capacity keys or None, first k_len where every row sees a key)

    @classmethod
    def from_args(cls, kv_start, mask):
        """The AttentionMask of an attention call given kv_start or mask: the caller's, or a fresh one."""
        if mask is None:
            return cls(kv_start)
        if kv_start is not None:
            raise ValueError("pass kv_start or mask (which carries its kv_start), not both")
        return mask

    def _memo(self, key, build):
        if self._masks is None or self._masks[0] != key:
            self._masks = (key, build())
        return self._masks[1]

    def sdpa_masks(self, batch, q_len, k_len, causal, dtype, device):
        """(mask for SDPA, rows that see some key or None if all do), or None when every key is visible.

        A row with no visible key makes SDPA's softmax 0/0 = NaN, and that NaN would leak into dK/dV
        through the backward even if the output were zeroed after the fact. So such rows see every
        key (finite math) and are zeroed with torch.where afterwards, which also zeroes their
        gradient. A single query (decoding) with left padding gets an additive mask in the
        queries' dtype instead (see _decode_mask), unless some row sees no key yet."""
        return self._memo((batch, q_len, k_len, causal, dtype, device),
                          lambda: self._build_sdpa_masks(batch, q_len, k_len, causal, dtype, device))

    def _build_sdpa_masks(self, batch, q_len, k_len, causal, dtype, device):
        if q_len == 1 and self.kv_start is not None:
            additive = self._decode_mask(k_len, device)
            if additive is not None:
                return additive.to(dtype), None  # 0 / -inf: exact in any dtype
        visible = visible_keys_mask(batch, q_len, k_len, causal=causal, kv_start=self.kv_start, device=device)
        if visible is None:
            return None
        row_sees_something = visible.any(dim=-1, keepdim=True)  # [B or 1, 1, Tq, 1]
        # The common case (decoding, no fully padded row) needs no zeroing afterwards.
        if bool(row_sees_something.all()):
            return visible, None
        return visible | ~row_sees_something, row_sees_something

    def _decode_mask(self, k_len, device):
        """Additive mask [B, 1, 1, k_len] (0 visible, -inf padding, fp32) of one query per row that sits
        after every key, or None while some row sees no key (the general path zeroes such rows).

        Each decoding step's mask is a prefix of the next one's: so it is built once over `capacity`
        keys and sliced, and the host check that every row sees a key runs once (rows see keys
        kv_start[b] <= j < k_len, so once all do, they do at every later step). Additive because
        SDPA would turn a boolean mask into this one in every layer: the same values, the same
        attention, bit for bit."""
        if self._decode is None:
            self._decode = (None, int(self.kv_start.max()) + 1)  # the one host sync of a decoding run
        additive, all_see_from = self._decode
        if k_len < all_see_from:
            return None
        if additive is None or additive.shape[-1] < k_len or additive.device != device:
            capacity = max(k_len, self.capacity or 0)
            starts = self.kv_start.to(device=device, dtype=torch.long)[:, None]
            padding = torch.arange(capacity, device=device)[None, :] < starts  # [B, capacity]
            additive = torch.zeros(padding.shape, dtype=torch.float32, device=device).masked_fill_(padding, float("-inf"))
            additive = additive[:, None, None, :]  # [B, 1, 1, capacity]
            self._decode = (additive, all_see_from)
        return additive[..., :k_len]

    def sliding_window_masks(self, q_len, k_len, window, device):
        """(mask for SDPA, rows that see some key) of sliding_window_attention_torch; rows that see
        no key see every key instead, as in sdpa_masks."""
        return self._memo(("window", q_len, k_len, window, device),
                          lambda: self._build_sliding_window_masks(q_len, k_len, window, device))

    def _build_sliding_window_masks(self, q_len, k_len, window, device):
        key_pos = torch.arange(k_len, device=device)
        query_pos = torch.arange(q_len, device=device) + (k_len - q_len)
        offset = query_pos[:, None] - key_pos[None, :]
        visible = ((offset >= 0) & (offset < window))[None, None]  # [1, 1, Tq, Tk]
        if self.kv_start is not None:
            visible = visible & (key_pos[None, :] >= self.kv_start.to(device, torch.long)[:, None])[:, None, None, :]
        sees_some = visible.any(-1, keepdim=True)
        return visible | ~sees_some, sees_some


def flash_attention_torch(q, k, v, *, causal=True, kv_start=None, softmax_scale=None, mask=None):
    """Reference-quality attention through torch SDPA. Same contract as flash_attention."""
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    assert q_len <= k_len, f"need Tq <= Tk, got Tq={q_len}, Tk={k_len}"
    assert q_heads % kv_heads == 0, f"Hq={q_heads} must be a multiple of Hkv={kv_heads}"
    mask = AttentionMask.from_args(kv_start, mask)
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5

    # SDPA wants [B, H, T, D]; these transposes are views.
    q_bhtd, k_bhtd, v_bhtd = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q_heads != kv_heads

    if causal and mask.kv_start is None and q_len == k_len:
        # Square causal: top-left and bottom-right alignment coincide, so SDPA's
        # is_causal fast path (flash backend on GPU) applies.
        out = F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)

    masks = mask.sdpa_masks(batch, q_len, k_len, causal, q.dtype, q.device)
    if masks is None:
        out = F.scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    safe_visible, row_sees_something = masks
    out = F.scaled_dot_product_attention(
        q_bhtd, k_bhtd, v_bhtd, attn_mask=safe_visible, scale=scale, enable_gqa=gqa
    )
    if row_sees_something is not None:
        out = torch.where(row_sees_something, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


def static_cache_attention_torch(q, k, v, bias, *, softmax_scale=None):
    """One query per row over a whole preallocated KV cache: q [B, 1, Hq, D], k/v [B, L, Hkv, D]
    (every slot of the cache, written or not), bias [B, 1, 1, L] additive in q's dtype: 0 where the
    row may see the key, -inf elsewhere (slots not written yet, left padding, outside a sliding
    window). The attention of Transformer's static decoding step, whose shapes never change from
    one token to the next (so that a CUDA graph can replay it); SDPA on every device, as the Triton
    kernel takes no arbitrary mask. Each row must see at least one key (its own, just written)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                         scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def sliding_window_attention_torch(q, k, v, *, window, kv_start=None, softmax_scale=None, mask=None):
    """Causal attention in which query i sees keys i - window < j <= i (Mistral's sliding window,
    the rule of Hugging Face's mask), bottom-right aligned like flash_attention. A query row that
    sees no key returns 0 with a zero gradient."""
    q_len, q_heads = q.shape[1], q.shape[2]
    mask = AttentionMask.from_args(kv_start, mask)
    safe_visible, sees_some = mask.sliding_window_masks(q_len, k.shape[1], window, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=safe_visible, scale=softmax_scale,
                                         enable_gqa=q_heads != k.shape[2])
    return torch.where(sees_some, out, 0.0).transpose(1, 2)


# --------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------
#
# Layout conventions shared by the kernels:
#   q, out, dq, do: [B, Tq, Hq, D]; k, v, dk, dv: [B, Tk, Hkv, D], any strides.
#   lse, delta: [B, Hq, Tq] fp32, contiguous.
#   Scores are kept in log2 units (scaled by softmax_scale * log2(e)) so the
#   kernels can use exp2; the saved lse is in natural-log units.
#
# Block-skipping: for a block of queries, keys split into three ranges of
# key blocks, [lo, a) masked, [a, b) fully visible, [b, hi) masked. Blocks
# before lo (all left padding) and from hi on (causal future / past Tk) are
# never touched. The backward's dK/dV kernel does the same for the query blocks
# seen by one key block.

if TRITON_AVAILABLE:
    # Globals read inside kernels must be constexpr.
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)

    # Under the interpreter (CPU testing) the block sizes are fixed and small, and
    # deliberately unequal so that the block arithmetic is exercised.
    from .triton_common import autotune, dot_precision, launcher

    INTERPRETER_BLOCKS = {
        "fwd": dict(BLOCK_M=32, BLOCK_N=16),
        "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
        "dq": dict(BLOCK_M=32, BLOCK_N=16),
        "delta": {},  # one fixed block on the GPU too
    }

    # GPU configs are (BLOCK_M, BLOCK_N, num_warps, num_stages), picked by compiling for
    # sm_90 and discarding shapes that spilled registers at D = 128; not yet timed on a GPU.
    # bench/compile_kernels.py recompiles them all (tests/test_compile_kernels.py: bf16, D = 128):
    # with Triton 3.9 one forward and four dK/dV configs spill 16-192 bytes, which the
    # autotuner's timing will weigh.
    def _autotune(configs, key):
        """autotune over (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
        return autotune([triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
                         for m, n, w, s in configs], key)

    @triton.jit
    def _visible_key_blocks(start_m, q_len, k_len, kv_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr):
        """Key ranges for the query block starting at start_m: masked [lo, a), full [a, b), masked [b, hi)."""
        position_offset = k_len - q_len  # query i sits at absolute position i + position_offset
        first_query_pos = start_m + position_offset
        last_query_pos = tl.minimum(start_m + BLOCK_M, q_len) - 1 + position_offset
        if CAUSAL:
            hi = tl.minimum(k_len, last_query_pos + 1)
            # Keys below full_hi are visible to every query of the block.
            full_hi = (tl.minimum(k_len, first_query_pos + 1) // BLOCK_N) * BLOCK_N
        else:
            hi = k_len
            full_hi = (k_len // BLOCK_N) * BLOCK_N
        lo = (kv_start // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(kv_start, BLOCK_N) * BLOCK_N  # first block with no left padding in it
        a = tl.minimum(full_lo, hi)
        b = tl.maximum(a, tl.minimum(full_hi, hi))
        return lo, a, b, hi

    @triton.jit
    def _attn_fwd_blocks(acc, row_sum, row_max, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                         block_lo, block_hi, query_pos, kv_start, k_len, qk_scale_log2,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Online-softmax update of (acc, row_sum, row_max) with key blocks [block_lo, block_hi)."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(block_lo, block_hi, BLOCK_N):
            key_pos = start_n + tl.arange(0, BLOCK_N)
            if MASKED:
                in_bounds = key_pos[:, None] < k_len
                k = tl.load(k_base + key_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=in_bounds, other=0.0)
                v = tl.load(v_base + key_pos[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=in_bounds, other=0.0)
            else:
                k = tl.load(k_base + key_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd)
                v = tl.load(v_base + key_pos[:, None] * stride_vt + offs_d[None, :] * stride_vd)

            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            if MASKED:
                visible = (key_pos[None, :] < k_len) & (key_pos[None, :] >= kv_start)
                if CAUSAL:
                    visible = visible & (key_pos[None, :] <= query_pos[:, None])
                scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            if MASKED:
                # A row that has seen no visible key yet keeps max = -inf; subtract 0
                # instead so exp2 gives 0 rather than exp2(-inf - -inf) = NaN.
                new_max_finite = tl.where(new_max == float("-inf"), 0.0, new_max)
            else:
                new_max_finite = new_max
            probs = tl.math.exp2(scores - new_max_finite[:, None])
            rescale = tl.math.exp2(row_max - new_max_finite)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None]
            acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            row_max = new_max
        return acc, row_sum, row_max

    @_autotune(
        configs=[(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 3)],
        key=["HEAD_DIM", "CAUSAL", "DOT_PRECISION", "q_len_bucket", "k_len_bucket"],
    )
    @triton.jit(do_not_specialize=["q_len_bucket", "k_len_bucket"])
    def _attn_fwd_kernel(
        Q, K, V, Out, LSE, KV_START,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_ob, stride_ot, stride_oh, stride_od,
        q_len, k_len, num_q_heads, group_size, qk_scale_log2,
        q_len_bucket, k_len_bucket,  # only keys for the autotuner's cache
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        batch_head = tl.program_id(1)
        batch = (batch_head // num_q_heads).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
        q_head = batch_head % num_q_heads
        kv_head = q_head // group_size  # grouped-query attention: K/V shared, never copied

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + batch * stride_qb + q_head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
        k_base = K + batch * stride_kb + kv_head * stride_kh
        v_base = V + batch * stride_vb + kv_head * stride_vh
        kv_start = tl.load(KV_START + batch)
        query_pos = offs_m + (k_len - q_len)

        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        lo, a, b, hi = _visible_key_blocks(start_m, q_len, k_len, kv_start, BLOCK_M, BLOCK_N, CAUSAL)
        acc, row_sum, row_max = _attn_fwd_blocks(
            acc, row_sum, row_max, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            lo, a, query_pos, kv_start, k_len, qk_scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
        acc, row_sum, row_max = _attn_fwd_blocks(
            acc, row_sum, row_max, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            a, b, query_pos, kv_start, k_len, qk_scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_PRECISION)
        acc, row_sum, row_max = _attn_fwd_blocks(
            acc, row_sum, row_max, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            b, hi, query_pos, kv_start, k_len, qk_scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)

        # Rows that saw no key: output 0, lse = +inf (so the backward's
        # probabilities exp(s - lse) are 0 and the row gets no gradient).
        sees_nothing = row_sum == 0.0
        safe_row_sum = tl.where(sees_nothing, 1.0, row_sum)
        out = acc / safe_row_sum[:, None]
        lse = tl.where(sees_nothing, float("inf"), (row_max + tl.math.log2(safe_row_sum)) * LN2)

        in_bounds = offs_m < q_len
        out_ptrs = Out + batch * stride_ob + q_head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=in_bounds[:, None])
        tl.store(LSE + batch_head * q_len + offs_m, lse, mask=in_bounds)

    @triton.jit
    def _attn_bwd_delta_kernel(
        Out, dO, Delta,
        stride_ob, stride_ot, stride_oh, stride_od,
        stride_dob, stride_dot, stride_doh, stride_dod,
        q_len, num_q_heads,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """delta_i = sum_d dO_id * O_id, the row term of the softmax backward."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        batch_head = tl.program_id(1)
        batch = (batch_head // num_q_heads).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
        q_head = batch_head % num_q_heads
        offs_d = tl.arange(0, HEAD_DIM)
        in_bounds = offs_m < q_len
        out = tl.load(Out + batch * stride_ob + q_head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                      mask=in_bounds[:, None], other=0.0)
        grad_out = tl.load(dO + batch * stride_dob + q_head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                           mask=in_bounds[:, None], other=0.0)
        delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
        tl.store(Delta + batch_head * q_len + offs_m, delta, mask=in_bounds)

    @triton.jit
    def _attn_bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dot, stride_dod,
                              block_lo, block_hi, key_pos, kv_start, q_len, k_len, qk_scale_log2,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dK, dV of one key block over query blocks [block_lo, block_hi) of one head."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in range(block_lo, block_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if MASKED:
                in_bounds = offs_m < q_len
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=in_bounds[:, None], other=0.0)
                grad_out = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=in_bounds[:, None], other=0.0)
                lse_log2 = tl.load(lse_base + offs_m, mask=in_bounds, other=float("inf")) * LOG2E
                delta = tl.load(delta_base + offs_m, mask=in_bounds, other=0.0)
            else:
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd)
                grad_out = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod)
                lse_log2 = tl.load(lse_base + offs_m) * LOG2E
                delta = tl.load(delta_base + offs_m)

            # Transposed problem ([keys, queries]) so the results land on dK/dV rows.
            scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
            probs_t = tl.math.exp2(scores_t - lse_log2[None, :])
            if MASKED:
                visible = (key_pos[:, None] < k_len) & (key_pos[:, None] >= kv_start) & (offs_m[None, :] < q_len)
                if CAUSAL:
                    visible = visible & (key_pos[:, None] <= offs_m[None, :] + (k_len - q_len))
                probs_t = tl.where(visible, probs_t, 0.0)
            dv = tl.dot(probs_t.to(grad_out.dtype), grad_out, dv, input_precision=DOT_PRECISION)
            grad_probs_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
            grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
            dk = tl.dot(grad_scores_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        return dk, dv

    @_autotune(
        configs=[(16, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (64, 128, 8, 1), (16, 64, 4, 2)],
        key=["HEAD_DIM", "CAUSAL", "DOT_PRECISION", "q_len_bucket", "k_len_bucket"],
    )
    @triton.jit(do_not_specialize=["q_len_bucket", "k_len_bucket"])
    def _attn_bwd_dkdv_kernel(
        Q, K, V, dO, LSE, Delta, dK, dV, KV_START,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_dob, stride_dot, stride_doh, stride_dod,
        stride_dkb, stride_dkt, stride_dkh, stride_dkd,
        stride_dvb, stride_dvt, stride_dvh, stride_dvd,
        q_len, k_len, num_q_heads, num_kv_heads, group_size, qk_scale_log2, softmax_scale,
        q_len_bucket, k_len_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        batch_kv_head = tl.program_id(1)
        batch = (batch_kv_head // num_kv_heads).to(tl.int64)
        kv_head = batch_kv_head % num_kv_heads

        key_pos = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_in_bounds = key_pos[:, None] < k_len
        k = tl.load(K + batch * stride_kb + kv_head * stride_kh + key_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=key_in_bounds, other=0.0)
        v = tl.load(V + batch * stride_vb + kv_head * stride_vh + key_pos[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=key_in_bounds, other=0.0)
        kv_start = tl.load(KV_START + batch)

        # Query ranges that see this key block: masked [q_lo, a), full [a, b), masked [b, q_len).
        position_offset = k_len - q_len
        if CAUSAL:
            q_lo = (tl.maximum(start_n - position_offset, 0) // BLOCK_M) * BLOCK_M
            # From q_full on, every query is at or after the block's last key.
            q_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - position_offset, 0), BLOCK_M) * BLOCK_M
        else:
            q_lo = 0
            q_full = 0
        block_needs_key_mask = (start_n + BLOCK_N > k_len) | (start_n < kv_start)
        a = tl.where(block_needs_key_mask, q_len, tl.minimum(q_full, q_len))
        b = tl.maximum(a, (q_len // BLOCK_M) * BLOCK_M)
        q_lo = tl.where(start_n + BLOCK_N <= kv_start, q_len, q_lo)  # pure left padding: seen by no query

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # dK, dV sum over every query head of this kv head's group.
        for head_in_group in range(0, group_size):
            q_head = kv_head * group_size + head_in_group
            q_base = Q + batch * stride_qb + q_head * stride_qh
            do_base = dO + batch * stride_dob + q_head * stride_doh
            lse_base = LSE + (batch * num_q_heads + q_head) * q_len
            delta_base = Delta + (batch * num_q_heads + q_head) * q_len
            dk, dv = _attn_bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                           stride_qt, stride_qd, stride_dot, stride_dod, q_lo, a, key_pos, kv_start,
                                           q_len, k_len, qk_scale_log2, HEAD_DIM, BLOCK_M, CAUSAL, True, DOT_PRECISION)
            dk, dv = _attn_bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                           stride_qt, stride_qd, stride_dot, stride_dod, a, b, key_pos, kv_start,
                                           q_len, k_len, qk_scale_log2, HEAD_DIM, BLOCK_M, CAUSAL, False, DOT_PRECISION)
            dk, dv = _attn_bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                           stride_qt, stride_qd, stride_dot, stride_dod, b, q_len, key_pos, kv_start,
                                           q_len, k_len, qk_scale_log2, HEAD_DIM, BLOCK_M, CAUSAL, True, DOT_PRECISION)

        dk = dk * softmax_scale  # scores = softmax_scale * q.k
        tl.store(dK + batch * stride_dkb + kv_head * stride_dkh + key_pos[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
                 dk.to(dK.dtype.element_ty), mask=key_in_bounds)
        tl.store(dV + batch * stride_dvb + kv_head * stride_dvh + key_pos[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
                 dv.to(dV.dtype.element_ty), mask=key_in_bounds)

    @triton.jit
    def _attn_bwd_dq_blocks(dq, q, grad_out, lse_log2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                            block_lo, block_hi, query_pos, kv_start, k_len, qk_scale_log2,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                            MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dQ of one query block over key blocks [block_lo, block_hi)."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(block_lo, block_hi, BLOCK_N):
            key_pos = start_n + tl.arange(0, BLOCK_N)
            if MASKED:
                in_bounds = key_pos[:, None] < k_len
                k = tl.load(k_base + key_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=in_bounds, other=0.0)
                v = tl.load(v_base + key_pos[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=in_bounds, other=0.0)
            else:
                k = tl.load(k_base + key_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd)
                v = tl.load(v_base + key_pos[:, None] * stride_vt + offs_d[None, :] * stride_vd)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            probs = tl.math.exp2(scores - lse_log2[:, None])
            if MASKED:
                visible = (key_pos[None, :] < k_len) & (key_pos[None, :] >= kv_start)
                if CAUSAL:
                    visible = visible & (key_pos[None, :] <= query_pos[:, None])
                probs = tl.where(visible, probs, 0.0)
            grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
            grad_scores = probs * (grad_probs - delta[:, None])
            dq = tl.dot(grad_scores.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        return dq

    @_autotune(
        configs=[(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2), (16, 64, 4, 3)],
        key=["HEAD_DIM", "CAUSAL", "DOT_PRECISION", "q_len_bucket", "k_len_bucket"],
    )
    @triton.jit(do_not_specialize=["q_len_bucket", "k_len_bucket"])
    def _attn_bwd_dq_kernel(
        Q, K, V, dO, LSE, Delta, dQ, KV_START,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_dob, stride_dot, stride_doh, stride_dod,
        stride_dqb, stride_dqt, stride_dqh, stride_dqd,
        q_len, k_len, num_q_heads, group_size, qk_scale_log2, softmax_scale,
        q_len_bucket, k_len_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        batch_head = tl.program_id(1)
        batch = (batch_head // num_q_heads).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
        q_head = batch_head % num_q_heads
        kv_head = q_head // group_size

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        in_bounds = offs_m < q_len
        q = tl.load(Q + batch * stride_qb + q_head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=in_bounds[:, None], other=0.0)
        grad_out = tl.load(dO + batch * stride_dob + q_head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                           mask=in_bounds[:, None], other=0.0)
        # Out-of-range rows get lse = +inf, hence probability 0 everywhere.
        lse_log2 = tl.load(LSE + batch_head * q_len + offs_m, mask=in_bounds, other=float("inf")) * LOG2E
        delta = tl.load(Delta + batch_head * q_len + offs_m, mask=in_bounds, other=0.0)
        k_base = K + batch * stride_kb + kv_head * stride_kh
        v_base = V + batch * stride_vb + kv_head * stride_vh
        kv_start = tl.load(KV_START + batch)
        query_pos = offs_m + (k_len - q_len)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        lo, a, b, hi = _visible_key_blocks(start_m, q_len, k_len, kv_start, BLOCK_M, BLOCK_N, CAUSAL)
        dq = _attn_bwd_dq_blocks(dq, q, grad_out, lse_log2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                 lo, a, query_pos, kv_start, k_len, qk_scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
        dq = _attn_bwd_dq_blocks(dq, q, grad_out, lse_log2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                 a, b, query_pos, kv_start, k_len, qk_scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_PRECISION)
        dq = _attn_bwd_dq_blocks(dq, q, grad_out, lse_log2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                 b, hi, query_pos, kv_start, k_len, qk_scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
        dq = dq * softmax_scale
        tl.store(dQ + batch * stride_dqb + q_head * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                 dq.to(dQ.dtype.element_ty), mask=in_bounds[:, None])

    def _length_bucket(n):
        """Next power of two: lengths in one bucket share an autotuning result."""
        return 1 << max(0, int(n) - 1).bit_length()

    _launch = launcher(INTERPRETER_BLOCKS)

    class _FlashAttentionTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, kv_start, causal, softmax_scale):
            batch, q_len, q_heads, head_dim = q.shape
            k_len, kv_heads = k.shape[1], k.shape[2]
            out = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
            lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
            precision = dot_precision(q.dtype)
            _launch(
                _attn_fwd_kernel,
                lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * q_heads),
                (q, k, v, out, lse, kv_start, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                 q_len, k_len, q_heads, q_heads // kv_heads, softmax_scale * LOG2E.value,
                 _length_bucket(q_len), _length_bucket(k_len)),
                "fwd",
                HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION=precision,
            )
            ctx.save_for_backward(q, k, v, out, lse, kv_start)
            ctx.causal, ctx.softmax_scale = causal, softmax_scale
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse, kv_start = ctx.saved_tensors
            batch, q_len, q_heads, head_dim = q.shape
            k_len, kv_heads = k.shape[1], k.shape[2]
            precision = dot_precision(q.dtype)
            scale = ctx.softmax_scale

            delta = torch.empty_like(lse)
            delta_block = 64
            _launch(
                _attn_bwd_delta_kernel, (triton.cdiv(q_len, delta_block), batch * q_heads),
                (out, grad_out, delta, *out.stride(), *grad_out.stride(), q_len, q_heads),
                "delta",
                HEAD_DIM=head_dim, BLOCK_M=delta_block,
            )
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
            dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
            buckets = (_length_bucket(q_len), _length_bucket(k_len))
            _launch(
                _attn_bwd_dkdv_kernel,
                lambda meta: (triton.cdiv(k_len, meta["BLOCK_N"]), batch * kv_heads),
                (q, k, v, grad_out, lse, delta, dk, dv, kv_start,
                 *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
                 q_len, k_len, q_heads, kv_heads, q_heads // kv_heads, scale * LOG2E.value, scale, *buckets),
                "dkdv",
                HEAD_DIM=head_dim, CAUSAL=ctx.causal, DOT_PRECISION=precision,
            )
            _launch(
                _attn_bwd_dq_kernel,
                lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * q_heads),
                (q, k, v, grad_out, lse, delta, dq, kv_start,
                 *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
                 q_len, k_len, q_heads, q_heads // kv_heads, scale * LOG2E.value, scale, *buckets),
                "dq",
                HEAD_DIM=head_dim, CAUSAL=ctx.causal, DOT_PRECISION=precision,
            )
            return dq, dk, dv, None, None, None

    def flash_attention_triton(q, k, v, *, causal=True, kv_start=None, softmax_scale=None):
        """FlashAttention-2 in Triton. Same contract as flash_attention."""
        batch, q_len, q_heads, head_dim = q.shape
        k_len, kv_heads = k.shape[1], k.shape[2]
        assert k.shape == v.shape and k.shape[0] == batch and k.shape[3] == head_dim, "k, v must be [B, Tk, Hkv, D]"
        assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
        assert q_len <= k_len, f"need Tq <= Tk, got Tq={q_len}, Tk={k_len}"
        assert q_heads % kv_heads == 0, f"Hq={q_heads} must be a multiple of Hkv={kv_heads}"
        assert head_dim in (16, 32, 64, 128), f"head dim {head_dim} not supported (16, 32, 64, 128)"
        if kv_start is None:
            kv_start = torch.zeros(batch, dtype=torch.int32, device=q.device)
        else:
            assert kv_start.shape == (batch,), "kv_start must be [B]"
            kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
        scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        return _FlashAttentionTriton.apply(q, k, v, kv_start, bool(causal), float(scale))
