"""Token log-probabilities without materialising an [N, V] probability tensor.

    logp = logprobs_from_logits(logits, targets, temperature=1.0)
    logp = fused_linear_logprobs(hidden, weight, targets, temperature=1.0)
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, return_entropy=True)

RLHF computes log pi(token | context) for every generated token, for the actor,
the reference model and the PTX loss. The naive `log_softmax(hidden @ W.T)`
builds an [N, V] fp32 tensor (N tokens, V = 32k..128k vocabulary) and keeps it
for the backward; at N = 16k, V = 128k that is 8 GiB, far more than the model's
activations. Here the vocabulary is processed in tiles with an *online*
log-sum-exp: for each row keep a running max m and a running sum
s = sum_j exp(z_j - m); when a tile raises the max, rescale s by exp(m_old - m_new).
At the end lse = m + log s and log p(target) = z_target - lse. The entropy of
the whole distribution needs one more running sum, t = sum_j exp(z_j - m)(z_j - m):
H = lse - E_p[z] = log s - t / s. Keeping t relative to the max matters: with
logits in the hundreds, lse - E_p[z] would cancel catastrophically in fp32.
When the max moves from m to m', t becomes exp(m - m') (t + s (m - m')).

Backward, with z = logits / temperature and p = softmax(z):
    d logp / d z_j = onehot_j - p_j
    d H    / d z_j = -p_j (log p_j + H)
so only the per-row lse (and H) is saved, and p is recomputed tile by tile.
For `fused_linear_logprobs` the gradient of a logits tile, dZ, is immediately
contracted: dHidden += dZ @ W_tile, dW_tile += dZ.T @ hidden.

Targets must be valid token ids in [0, V). There is no ignore index: pass any
valid id (e.g. 0) at padded positions and mask the result afterwards. Inputs of
shape [..., V] / [..., D] are flattened with reshape, which copies when they
cannot be viewed as [N, V] (e.g. logits[:, :-1]); for fused_linear_logprobs that
copy is only [N, D], so slice the hidden states rather than the logits.

Two implementations compute the same functions (rlhf_kernels/__init__.py decides
which one runs); outputs are always fp32:

* PyTorch (CPU, debugging): fused_linear_logprobs walks the vocabulary in chunks
  of C columns with the same online log-sum-exp, materialising [N, C] at a time
  (memory O(N * C), C = CHUNK_ELEMENTS // N), and its backward recomputes each
  chunk; logprobs_from_logits walks chunks of rows.
* Triton: see the section below.
"""

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the PyTorch path still works
    TRITON_AVAILABLE = False


# Each chunk of the PyTorch path materialises about this many fp32 logits
# (16 MiB): row chunks of CHUNK_ELEMENTS // V rows for logprobs_from_logits,
# vocabulary chunks of CHUNK_ELEMENTS // N columns for fused_linear_logprobs.
CHUNK_ELEMENTS = 1 << 22


def _chunks(total, width):
    """(start, end) pairs covering range(total) in steps of width."""
    return [(start, min(start + width, total)) for start in range(0, total, width)]


def _flatten(x, targets, what):
    """[..., K] and [...] -> [N, K] and [N], plus the leading shape to restore."""
    assert x.shape[:-1] == targets.shape, f"{what} shape {tuple(x.shape)} does not match targets {tuple(targets.shape)}"
    leading_shape = targets.shape
    return x.reshape(-1, x.shape[-1]), targets.reshape(-1), leading_shape


def _grad_of_logits(z, logsumexp, entropy, grad_logp, grad_entropy, target_rows, target_cols, temperature):
    """dLoss/dlogits for a block of fp32 scaled logits z = logits / T, shape [n, C]; reuses z's memory.

    With p = softmax(z): dlogp/dz = onehot - p and dH/dz = -p (log p + H), so
    dLoss/dlogits = (p * (-g_H (log p + H) - g) + g * onehot) / T.
    target_rows, target_cols: the rows whose target lies in this block, and its column there.
    """
    log_probs = z.sub_(logsumexp[:, None])
    probs = log_probs.exp()
    grad_logp = None if grad_logp is None else grad_logp.float() / temperature
    if grad_entropy is None:
        grad_z = probs.mul_(-grad_logp[:, None])
    else:
        grad_entropy = grad_entropy.float() / temperature
        offset = grad_entropy * entropy + (0.0 if grad_logp is None else grad_logp)
        grad_z = log_probs.mul_(-grad_entropy[:, None]).sub_(offset[:, None]).mul_(probs)
    if grad_logp is not None:
        grad_z[target_rows, target_cols] += grad_logp[target_rows]
    return grad_z


def _accumulate_linear_grads(grad_z, hidden, weight, start, end, grad_hidden, grad_weight):
    """Contract dLoss/dlogits for vocabulary rows [start, end) into dHidden (fp32, accumulated) and dW[start:end]."""
    grad_z = grad_z.to(weight.dtype)
    if grad_weight is not None:
        torch.mm(grad_z.t(), hidden, out=grad_weight[start:end])
    if grad_hidden is not None:
        if grad_hidden.dtype == weight.dtype:
            grad_hidden.addmm_(grad_z, weight[start:end])
        else:
            grad_hidden += torch.mm(grad_z, weight[start:end]).float()


# --------------------------------------------------------------------------------------
# Plain PyTorch path: logprobs_from_logits (chunks of rows)
# --------------------------------------------------------------------------------------


class _LogprobsFromLogitsTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        num_rows, vocab_size = logits.shape
        logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
        logsumexp = torch.empty_like(logp)
        for start, end in _chunks(num_rows, max(1, CHUNK_ELEMENTS // vocab_size)):
            z = logits[start:end].float() / temperature
            logsumexp[start:end] = torch.logsumexp(z, dim=-1)
            logp[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - logsumexp[start:end]
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.temperature = temperature
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, logsumexp = ctx.saved_tensors
        # The gradient tensor is the only [N, V] allocation; each chunk is written into it.
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for start, end in _chunks(logits.shape[0], max(1, CHUNK_ELEMENTS // logits.shape[1])):
            z = logits[start:end].float() / ctx.temperature
            rows = torch.arange(end - start, device=z.device)
            grad_logits[start:end] = _grad_of_logits(z, logsumexp[start:end], None, grad_logp[start:end], None,
                                                     rows, targets[start:end], ctx.temperature)
        return grad_logits, None, None


def logprobs_from_logits_torch(logits, targets, temperature=1.0):
    """fp32 log p(targets) under softmax(logits / temperature); logits [..., V], targets [...]."""
    logits_2d, targets_1d, leading_shape = _flatten(logits, targets, "logits")
    logp = _LogprobsFromLogitsTorch.apply(logits_2d, targets_1d.long(), float(temperature))
    return logp.reshape(leading_shape)


# --------------------------------------------------------------------------------------
# Plain PyTorch path: fused_linear_logprobs (chunks of the vocabulary)
# --------------------------------------------------------------------------------------


def _targets_in(targets, start, end):
    """Rows whose target falls in vocabulary columns [start, end), and the column within the chunk."""
    rows = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
    return rows, targets[rows] - start


class _FusedLinearLogprobsTorch(torch.autograd.Function):
    """Returns logp, or (logp, entropy) when with_entropy (the entropy costs an extra pass per chunk)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        num_rows, vocab_size = hidden.shape[0], weight.shape[0]
        # Scaling the [N, D] input is cheaper than scaling every [N, C] logits chunk.
        scaled_hidden = hidden if temperature == 1.0 else hidden / temperature
        row_max = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
        sum_exp = torch.zeros_like(row_max)  # s = sum_j exp(z_j - max)
        sum_exp_shifted_z = torch.zeros_like(row_max)  # t = sum_j exp(z_j - max) (z_j - max), for the entropy
        target_z = torch.zeros_like(row_max)
        for start, end in _chunks(vocab_size, max(1, CHUNK_ELEMENTS // max(num_rows, 1))):
            z = (scaled_hidden @ weight[start:end].t()).float()  # [N, C]; matmul in the input dtype, as naive
            rows, cols = _targets_in(targets, start, end)
            target_z[rows] = z[rows, cols]
            new_max = torch.maximum(row_max, z.max(dim=-1).values)
            rescale = torch.exp(row_max - new_max)
            shifted_z = z.sub_(new_max[:, None])
            unnormalised = shifted_z.exp()
            if with_entropy:
                max_shift = torch.where(row_max == float("-inf"), 0.0, row_max - new_max)  # nothing to shift at first
                sum_exp_shifted_z = rescale * (sum_exp_shifted_z + sum_exp * max_shift)
                sum_exp_shifted_z += (unnormalised * shifted_z).sum(dim=-1)
            sum_exp = sum_exp * rescale + unnormalised.sum(dim=-1)
            row_max = new_max
        log_sum_exp = torch.log(sum_exp)
        logsumexp = row_max + log_sum_exp
        logp = target_z - logsumexp
        entropy = log_sum_exp - sum_exp_shifted_z / sum_exp  # H = log s - t / s
        # When the whole vocabulary fit in one chunk (small N * V: the chunk is all there is, so
        # memory stays O(chunk)), keep its shifted logits for the backward instead of recomputing
        # the matmul: with z - max, log-probs are (z - max) - log s.
        one_chunk = num_rows * vocab_size <= CHUNK_ELEMENTS
        kept = (shifted_z, log_sum_exp) if one_chunk and any(ctx.needs_input_grad[:2]) else ()
        ctx.save_for_backward(hidden, scaled_hidden, weight, targets, logsumexp, entropy, *kept)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, scaled_hidden, weight, targets, logsumexp, entropy, *kept = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows, vocab_size = hidden.shape[0], weight.shape[0]
        # fp32 accumulator over vocabulary chunks; dW is written chunk by chunk, exactly once.
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if want_weight else None
        for start, end in _chunks(vocab_size, max(1, CHUNK_ELEMENTS // max(num_rows, 1))):
            if kept:  # one chunk, kept by the forward: (z - max, log s) instead of (z, max + log s)
                z, lse = kept
            else:
                z, lse = (scaled_hidden @ weight[start:end].t()).float(), logsumexp
            rows, cols = _targets_in(targets, start, end)
            grad_logits = _grad_of_logits(z, lse, entropy, grad_logp, grad_entropy, rows, cols, ctx.temperature)
            _accumulate_linear_grads(grad_logits, hidden, weight, start, end, grad_hidden, grad_weight)
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_linear_logprobs_torch(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """log p(targets) (and optionally entropy) of softmax(hidden @ weight.T / temperature), in vocabulary chunks."""
    assert hidden.dtype == weight.dtype, f"hidden {hidden.dtype} and weight {weight.dtype} must share a dtype"
    hidden_2d, targets_1d, leading_shape = _flatten(hidden, targets, "hidden")
    result = _FusedLinearLogprobsTorch.apply(hidden_2d, weight, targets_1d.long(), float(temperature), bool(return_entropy))
    if return_entropy:
        logp, entropy = result
        return logp.reshape(leading_shape), entropy.reshape(leading_shape)
    return result.reshape(leading_shape)


# --------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------
#
# logprobs_from_logits: one program per row walks the vocabulary in tiles
# (forward: online log-sum-exp; backward: writes the row of the gradient).
#
# fused_linear_logprobs:
#   forward  - each program owns a block of rows and a slice ("split") of the
#              vocabulary. It computes logits tiles hidden @ W_tile.T in registers
#              (fp32 accumulation), folds them into the running max m, s, t and
#              target logit, and writes those four partials per row. A tiny
#              torch step merges the splits into lse, logp and entropy. Splitting
#              the vocabulary keeps the GPU busy when N is small.
#   backward - the vocabulary is processed in chunks of C columns: a kernel
#              recomputes the logits tile by tile and writes dLoss/dlogits for the
#              chunk into one reusable [N, C] buffer; two matmuls then give
#              dW[chunk] = dZ.T @ hidden and dHidden += dZ @ W[chunk]. Peak extra
#              memory is that buffer plus an fp32 [N, D] accumulator, never [N, V].

# Extra memory of the Triton backward: the [N, C] gradient chunk holds about
# this many elements (C = this // N, rounded to a multiple of VOCAB_CHUNK_ALIGN).
BACKWARD_CHUNK_ELEMENTS = 1 << 27
VOCAB_CHUNK_ALIGN = 128

if TRITON_AVAILABLE:
    from .triton_common import INTERPRETED, autotune, dot_precision, launcher

    # Fixed small blocks under the interpreter (CPU testing); autotuned on a GPU.
    INTERPRETER_BLOCKS = {
        "row": dict(BLOCK_V=32),
        "fused": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16),
    }
    INTERPRETER_VOCAB_SPLITS = 3

    _launch = launcher(INTERPRETER_BLOCKS)

    _ROW_CONFIGS = [triton.Config(dict(BLOCK_V=bv), num_warps=w) for bv, w in [(1024, 4), (2048, 8), (4096, 8), (8192, 16)]]

    @autotune(_ROW_CONFIGS, key=["vocab_size"])
    @triton.jit
    def _logits_logprob_fwd_kernel(LOGITS, TARGETS, LOGP, LSE, vocab_size, stride_row, inv_temperature,
                                   BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_logits = LOGITS + row * stride_row
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_logits + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32) * inv_temperature
            new_max = tl.maximum(running_max, tl.max(z, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target = tl.load(TARGETS + row)
        target_z = tl.load(row_logits + target).to(tl.float32) * inv_temperature
        tl.store(LOGP + row, target_z - lse)
        tl.store(LSE + row, lse)

    @autotune(_ROW_CONFIGS, key=["vocab_size"])
    @triton.jit
    def _logits_logprob_bwd_kernel(LOGITS, TARGETS, LSE, GRAD_LOGP, GRAD_LOGITS, vocab_size, stride_row,
                                   stride_grad_row, inv_temperature, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_logits = LOGITS + row * stride_row
        row_grad = GRAD_LOGITS + row * stride_grad_row
        lse = tl.load(LSE + row)
        target = tl.load(TARGETS + row)
        grad_logp = tl.load(GRAD_LOGP + row).to(tl.float32)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_bounds = cols < vocab_size
            z = tl.load(row_logits + cols, mask=in_bounds, other=0.0).to(tl.float32) * inv_temperature
            probs = tl.exp(z - lse)
            onehot = tl.where(cols == target, 1.0, 0.0)
            grad = grad_logp * (onehot - probs) * inv_temperature
            tl.store(row_grad + cols, grad.to(GRAD_LOGITS.dtype.element_ty), mask=in_bounds)

    class _LogprobsFromLogitsTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets, temperature):
            num_rows, vocab_size = logits.shape
            logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
            lse = torch.empty_like(logp)
            if num_rows > 0:
                _launch(_logits_logprob_fwd_kernel, (num_rows,),
                        (logits, targets, logp, lse, vocab_size, logits.stride(0), 1.0 / temperature), "row")
            ctx.save_for_backward(logits, targets, lse)
            ctx.temperature = temperature
            return logp

        @staticmethod
        def backward(ctx, grad_logp):
            logits, targets, lse = ctx.saved_tensors
            num_rows, vocab_size = logits.shape
            # The gradient is the only [N, V] allocation.
            grad_logits = torch.empty((num_rows, vocab_size), dtype=logits.dtype, device=logits.device)
            if num_rows > 0:
                _launch(_logits_logprob_bwd_kernel, (num_rows,),
                        (logits, targets, lse, grad_logp.contiguous(), grad_logits, vocab_size, logits.stride(0),
                         grad_logits.stride(0), 1.0 / ctx.temperature), "row")
            return grad_logits, None, None

    def logprobs_from_logits_triton(logits, targets, temperature=1.0):
        """fp32 log p(targets) under softmax(logits / temperature); logits [..., V], targets [...]."""
        logits_2d, targets_1d, leading_shape = _flatten(logits, targets, "logits")
        if logits_2d.stride(-1) != 1:
            logits_2d = logits_2d.contiguous()
        logp = _LogprobsFromLogitsTriton.apply(logits_2d, targets_1d.contiguous(), float(temperature))
        return logp.reshape(leading_shape)

    # ---- fused_linear_logprobs ----

    def _fused_configs():
        # (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages): shapes that compile for sm_90
        # (bench/compile_kernels.py), all without register spills but one forward config (8 bytes,
        # Triton 3.9, bf16); not yet timed on a GPU.
        shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3),
                  (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)]
        return [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d), num_warps=w, num_stages=s) for n, v, d, w, s in shapes]

    @triton.jit
    def _logits_tile(H, W, rows, cols, num_rows, vocab_end, hidden_dim, stride_hn, stride_hd, stride_wv, stride_wd,
                     inv_temperature, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """(hidden[rows] @ W[cols].T) / temperature as an fp32 [BLOCK_N, BLOCK_V] tile."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        row_ok = rows[:, None] < num_rows
        col_ok = cols[:, None] < vocab_end
        h_ptrs = H + rows[:, None].to(tl.int64) * stride_hn
        w_ptrs = W + cols[:, None].to(tl.int64) * stride_wv
        for d0 in range(0, hidden_dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d[None, :] < hidden_dim
            h = tl.load(h_ptrs + offs_d[None, :] * stride_hd, mask=row_ok & d_ok, other=0.0)
            w = tl.load(w_ptrs + offs_d[None, :] * stride_wd, mask=col_ok & d_ok, other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        return acc * inv_temperature

    @autotune(_fused_configs(), key=["hidden_dim", "DOT_PRECISION"])
    @triton.jit
    def _linear_logprob_fwd_kernel(
        H, W, TARGETS, PARTIALS,
        num_rows, vocab_size, hidden_dim, inv_temperature, num_splits,
        stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < num_rows
        targets = tl.load(TARGETS + rows, mask=row_ok, other=-1)

        tiles_per_split = tl.cdiv(tl.cdiv(vocab_size, BLOCK_V), num_splits)
        v_lo = split * tiles_per_split * BLOCK_V
        v_hi = tl.minimum(vocab_size, v_lo + tiles_per_split * BLOCK_V)

        running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)  # s = sum_j exp(z_j - max)
        sum_exp_shifted_z = tl.zeros([BLOCK_N], dtype=tl.float32)  # t = sum_j exp(z_j - max) (z_j - max)
        target_z = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(v_lo, v_hi, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = _logits_tile(H, W, rows, cols, num_rows, vocab_size, hidden_dim, stride_hn, stride_hd, stride_wv,
                             stride_wd, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
            valid = cols[None, :] < vocab_size
            target_z += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), 1)
            new_max = tl.maximum(running_max, tl.max(tl.where(valid, z, float("-inf")), 1))  # finite: a valid column
            rescale = tl.exp(running_max - new_max)
            max_shift = tl.where(running_max == float("-inf"), 0.0, running_max - new_max)  # first tile: nothing to shift
            shifted_z = tl.where(valid, z - new_max[:, None], float("-inf"))
            unnormalised = tl.exp(shifted_z)
            sum_exp_shifted_z = rescale * (sum_exp_shifted_z + sum_exp * max_shift)
            sum_exp_shifted_z += tl.sum(unnormalised * tl.where(valid, shifted_z, 0.0), 1)
            sum_exp = sum_exp * rescale + tl.sum(unnormalised, 1)
            running_max = new_max

        # PARTIALS is [4, num_splits, N]; a split past the vocabulary writes (-inf, 0, 0, 0).
        out = PARTIALS + split * num_rows + rows
        stride_kind = num_splits * num_rows
        tl.store(out, running_max, mask=row_ok)
        tl.store(out + stride_kind, sum_exp, mask=row_ok)
        tl.store(out + 2 * stride_kind, sum_exp_shifted_z, mask=row_ok)
        tl.store(out + 3 * stride_kind, target_z, mask=row_ok)

    @autotune(_fused_configs(), key=["hidden_dim", "DOT_PRECISION"])
    @triton.jit
    def _linear_logprob_grad_logits_kernel(
        H, W, TARGETS, LSE, ENTROPY, GRAD_LOGP, GRAD_ENTROPY, GRAD_Z,
        num_rows, vocab_start, vocab_end, hidden_dim, inv_temperature,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_gzn, stride_gzv,
        HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """GRAD_Z[n, j - vocab_start] = dLoss / dlogits[n, j] for vocabulary columns [vocab_start, vocab_end)."""
        # Grouped launch order (as in Triton's matmul tutorial): programs that run
        # together share a few row blocks and W tiles, which then stay in L2.
        GROUP_N: tl.constexpr = 8
        pid = tl.program_id(0)
        num_row_blocks = tl.cdiv(num_rows, BLOCK_N)
        num_vocab_blocks = tl.cdiv(vocab_end - vocab_start, BLOCK_V)
        programs_per_group = GROUP_N * num_vocab_blocks
        first_row_block = (pid // programs_per_group) * GROUP_N
        group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_N)
        row_block = first_row_block + (pid % programs_per_group) % group_rows
        vocab_block = (pid % programs_per_group) // group_rows

        rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = vocab_start + vocab_block * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < num_rows
        z = _logits_tile(H, W, rows, cols, num_rows, vocab_end, hidden_dim, stride_hn, stride_hd, stride_wv, stride_wd,
                         inv_temperature, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        probs = tl.exp(z - lse[:, None])
        grad_z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_ENTROPY:
            # dH/dz_j = -p_j (log p_j + H)
            entropy = tl.load(ENTROPY + rows, mask=row_ok, other=0.0)
            grad_entropy = tl.load(GRAD_ENTROPY + rows, mask=row_ok, other=0.0)
            grad_z -= grad_entropy[:, None] * probs * (z - lse[:, None] + entropy[:, None])
        if HAS_GRAD_LOGP:
            # d logp/dz_j = onehot_j - p_j
            targets = tl.load(TARGETS + rows, mask=row_ok, other=-1)
            grad_logp = tl.load(GRAD_LOGP + rows, mask=row_ok, other=0.0)
            onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
            grad_z += grad_logp[:, None] * (onehot - probs)
        grad_z = grad_z * inv_temperature  # z = logits / temperature

        out = GRAD_Z + rows[:, None].to(tl.int64) * stride_gzn + (cols - vocab_start)[None, :] * stride_gzv
        tl.store(out, grad_z.to(GRAD_Z.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < vocab_end))

    def _num_vocab_splits(num_rows, device):
        if INTERPRETED:
            return INTERPRETER_VOCAB_SPLITS
        # Enough (row block, split) programs for ~4 waves, assuming 128-row blocks.
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(32, triton.cdiv(4 * num_sms, triton.cdiv(num_rows, 128))))

    class _FusedLinearLogprobsTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature):
            num_rows, hidden_dim = hidden.shape
            vocab_size = weight.shape[0]
            num_splits = _num_vocab_splits(num_rows, hidden.device)
            partials = torch.empty((4, num_splits, num_rows), dtype=torch.float32, device=hidden.device)
            precision = dot_precision(hidden.dtype)
            if num_rows > 0:
                _launch(
                    _linear_logprob_fwd_kernel,
                    lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]), num_splits),
                    (hidden, weight, targets, partials, num_rows, vocab_size, hidden_dim, 1.0 / temperature, num_splits,
                     *hidden.stride(), *weight.stride()),
                    "fused",
                    DOT_PRECISION=precision,
                )
            # Merge the vocabulary splits: move each split's sums to the global max.
            split_max, split_sum_exp, split_sum_exp_shifted_z, split_target_z = partials
            row_max = split_max.max(dim=0).values
            rescale = torch.exp(split_max - row_max)  # 0 for empty splits
            max_shift = torch.where(split_max == float("-inf"), 0.0, split_max - row_max)
            sum_exp = (split_sum_exp * rescale).sum(dim=0)
            sum_exp_shifted_z = (rescale * (split_sum_exp_shifted_z + split_sum_exp * max_shift)).sum(dim=0)
            logsumexp = row_max + torch.log(sum_exp)
            entropy = torch.log(sum_exp) - sum_exp_shifted_z / sum_exp  # H = log s - t / s
            logp = split_target_z.sum(dim=0) - logsumexp

            ctx.save_for_backward(hidden, weight, targets, logsumexp, entropy)
            ctx.temperature = temperature
            ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
            return logp, entropy

        @staticmethod
        def backward(ctx, grad_logp, grad_entropy):
            hidden, weight, targets, logsumexp, entropy = ctx.saved_tensors
            num_rows, hidden_dim = hidden.shape
            vocab_size = weight.shape[0]
            want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            precision = dot_precision(hidden.dtype)

            # fp32 accumulator across vocabulary chunks (the final result when hidden is fp32).
            grad_hidden = torch.zeros((num_rows, hidden_dim), dtype=torch.float32, device=hidden.device) if want_hidden else None
            grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_weight else None
            chunk = BACKWARD_CHUNK_ELEMENTS // max(num_rows, 1) // VOCAB_CHUNK_ALIGN * VOCAB_CHUNK_ALIGN
            chunk = min(max(chunk, VOCAB_CHUNK_ALIGN), vocab_size)
            grad_z_buffer = torch.empty((num_rows, chunk), dtype=hidden.dtype, device=hidden.device)
            dummy = logsumexp  # stands in for an absent upstream gradient; never read
            for vocab_start in range(0, vocab_size, chunk):
                vocab_end = min(vocab_start + chunk, vocab_size)
                grad_z = grad_z_buffer[:, : vocab_end - vocab_start]
                _launch(
                    _linear_logprob_grad_logits_kernel,
                    lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]) * triton.cdiv(vocab_end - vocab_start, meta["BLOCK_V"]),),
                    (hidden, weight, targets, logsumexp, entropy,
                     dummy if grad_logp is None else grad_logp.contiguous(),
                     dummy if grad_entropy is None else grad_entropy.contiguous(),
                     grad_z, num_rows, vocab_start, vocab_end, hidden_dim, 1.0 / ctx.temperature,
                     *hidden.stride(), *weight.stride(), *grad_z.stride()),
                    "fused",
                    HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
                    DOT_PRECISION=precision,
                )
                _accumulate_linear_grads(grad_z, hidden, weight, vocab_start, vocab_end, grad_hidden, grad_weight)
            if want_hidden:
                grad_hidden = grad_hidden.to(hidden.dtype)
            return grad_hidden, grad_weight, None, None

    def fused_linear_logprobs_triton(hidden, weight, targets, temperature=1.0, return_entropy=False):
        """log p(targets) (and optionally entropy) of softmax(hidden @ weight.T / temperature), never forming [N, V]."""
        assert hidden.dtype == weight.dtype, f"hidden {hidden.dtype} and weight {weight.dtype} must share a dtype"
        assert hidden.shape[-1] == weight.shape[1], "hidden [..., D] and weight [V, D] disagree on D"
        hidden_2d, targets_1d, leading_shape = _flatten(hidden, targets, "hidden")
        logp, entropy = _FusedLinearLogprobsTriton.apply(hidden_2d, weight, targets_1d.contiguous(), float(temperature))
        if return_entropy:
            return logp.reshape(leading_shape), entropy.reshape(leading_shape)
        return logp.reshape(leading_shape)
