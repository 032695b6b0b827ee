"""flash_attention (Triton and PyTorch paths) against float64 softmax attention written out here.

Without a GPU the Triton kernels run in Triton's interpreter (set up in
tests/kernel_testing.py); with a GPU the same tests run the compiled kernels on
CUDA. The tests call the `*_triton` and `*_torch` functions directly, whatever
KERNELS says.

Shapes are drawn per test from a seed derived from the test's name (set
KERNELS_TEST_SEED to draw different ones); lengths are never multiples of a block.
"""

import pytest
import torch

from kernel_testing import (DEVICE, HAS_CUDA, draw, needs_cuda, needs_triton, rlhf_kernels, rng_for,
                            skip_if_triton_cannot_run)

# (atol, rtol) for the output and for the gradients, per input dtype.
TOLERANCES = {
    torch.float32: ((1e-4, 1e-4), (2e-4, 2e-4)),
    torch.float16: ((4e-3, 4e-3), (1e-2, 1e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 6e-2)),
}
IMPLEMENTATIONS = {"triton": rlhf_kernels.flash_attention_triton, "torch": rlhf_kernels.flash_attention_torch}


def draw_length(gen, low, high):
    """Random length in [low, high] that is not a multiple of 16 (nor of any larger block)."""
    n = draw(gen, low, high)
    return n + 1 if n % 16 == 0 else n


def reference_attention(q, k, v, causal, kv_start, softmax_scale=None):
    """Plain float64 softmax attention with an explicit mask; rows that see no key output 0."""
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(group, dim=2)  # query head h uses kv head h // group
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale

    query_pos = torch.arange(q_len) + (k_len - q_len)
    key_pos = torch.arange(k_len)
    visible = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
    if causal:
        visible &= key_pos[None, None, None, :] <= query_pos[None, None, :, None]
    if kv_start is not None:
        visible &= key_pos[None, None, None, :] >= kv_start.cpu()[:, None, None, None]
    visible = visible.to(q.device)

    # Fill masked scores with -inf, except in rows with nothing visible (fill 0 there
    # so softmax stays finite); multiplying by the mask then zeroes those rows.
    has_visible = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible & has_visible, float("-inf")).masked_fill(~has_visible, 0.0)
    probs = torch.softmax(scores, dim=-1) * visible
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def make_case(gen, scenario, group, dtype, head_dim=None):
    """Draw shapes and inputs for one scenario; returns q, k, v, causal, kv_start."""
    batch = draw(gen, 1, 2)
    kv_heads = draw(gen, 1, 2)
    head_dim = head_dim or [16, 32, 64][draw(gen, 0, 2)]
    causal, kv_start = True, None
    if scenario == "prefill":
        k_len = q_len = draw_length(gen, 17, 70)
    elif scenario == "chunked_prefill":
        k_len = draw_length(gen, 20, 80)
        q_len = draw_length(gen, 2, k_len - 3)
    elif scenario == "decode":
        k_len = draw_length(gen, 5, 90)
        q_len = 1
        kv_start = torch.tensor([draw(gen, 0, k_len - 1) for _ in range(batch)])
    elif scenario == "left_padding":
        k_len = q_len = draw_length(gen, 20, 60)
        # Large pads leave early query rows with no visible key at all.
        kv_start = torch.tensor([draw(gen, k_len // 3, k_len - 2) for _ in range(batch)])
    elif scenario == "non_causal":
        causal = False
        k_len = draw_length(gen, 10, 60)
        q_len = draw_length(gen, 1, k_len)
        kv_start = torch.tensor([draw(gen, 0, k_len // 2) for _ in range(batch)])
    else:
        raise ValueError(scenario)
    q = torch.randn(batch, q_len, kv_heads * group, head_dim, generator=gen)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen)
    q, k, v = (x.to(device=DEVICE, dtype=dtype) for x in (q, k, v))
    if kv_start is not None:
        kv_start = kv_start.to(DEVICE)
    return q, k, v, causal, kv_start


def check_against_reference(attention, q, k, v, causal, kv_start, gen, softmax_scale=None):
    """Forward and dq, dk, dv of `attention` against the float64 reference."""
    (out_atol, out_rtol), (grad_atol, grad_rtol) = TOLERANCES[q.dtype]
    shapes = f"q {tuple(q.shape)} k {tuple(k.shape)} causal={causal} kv_start={kv_start}"
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, causal=causal, kv_start=kv_start, softmax_scale=softmax_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    grad_out = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(q64, k64, v64, causal, kv_start, softmax_scale)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())

    assert torch.isfinite(out).all(), shapes
    torch.testing.assert_close(out.double(), expected, atol=out_atol, rtol=out_rtol, msg=lambda m: f"{shapes}\n{m}")
    for name, got, want in zip("qkv", grads, expected_grads):
        assert torch.isfinite(got).all(), f"d{name} not finite; {shapes}"
        torch.testing.assert_close(got.double(), want, atol=grad_atol, rtol=grad_rtol,
                                   msg=lambda m: f"d{name}: {shapes}\n{m}")
    return out, grads


SCENARIOS = ["prefill", "chunked_prefill", "decode", "left_padding", "non_causal"]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_matches_reference(request, impl, dtype, group, scenario):
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    check_against_reference(IMPLEMENTATIONS[impl], *make_case(gen, scenario, group, dtype), gen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_head_dim_128_and_custom_scale(request, impl):
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    q, k, v, causal, kv_start = make_case(gen, "chunked_prefill", 2, torch.float32, head_dim=128)
    check_against_reference(IMPLEMENTATIONS[impl], q, k, v, causal, kv_start, gen, softmax_scale=0.05)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
def test_fully_masked_rows_are_zero_with_zero_grad(request, impl, causal):
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    batch, q_len, k_len, q_heads, kv_heads, head_dim = 3, 21, 37, 4, 2, 32
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    # Batch 0: no padding. Batch 1: every key padded. Batch 2: padding past the first queries.
    kv_start = torch.tensor([0, k_len, k_len - q_len + 7], device=DEVICE)
    out = IMPLEMENTATIONS[impl](q, k, v, causal=causal, kv_start=kv_start)
    out.square().sum().backward()

    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    if causal:  # queries at positions < kv_start see nothing
        blind_rows = (torch.arange(q_len) + k_len - q_len) < kv_start[2].item()
        assert blind_rows.sum() == 7
        assert (out[2, blind_rows] == 0).all() and (q.grad[2, blind_rows] == 0).all()
        assert (out[2, ~blind_rows] != 0).any(dim=-1).all()
    else:
        assert (out[2] != 0).any(dim=-1).all()
    assert (k.grad[2, : kv_start[2]] == 0).all() and (v.grad[2, : kv_start[2]] == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_non_contiguous_inputs(request, impl):
    """A slice of a preallocated KV cache and a transposed query, as the model passes them."""
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    batch, q_heads, kv_heads, head_dim, cache_len, k_len, q_len = 2, 4, 2, 32, 64, 45, 13
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen).to(DEVICE).transpose(1, 2)  # [B, Tq, Hq, D] view
    k_cache = torch.randn(batch, cache_len, kv_heads, head_dim, generator=gen).to(DEVICE)
    v_cache = torch.randn(batch, cache_len, kv_heads, head_dim, generator=gen).to(DEVICE)
    k, v = k_cache[:, :k_len], v_cache[:, :k_len]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kv_start = torch.tensor([0, 5], device=DEVICE)
    check_against_reference(IMPLEMENTATIONS[impl], q, k, v, True, kv_start, gen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_inference_under_no_grad(request, impl):
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    q, k, v, causal, kv_start = make_case(gen, "decode", 2, torch.float32)
    with torch.no_grad():
        out = IMPLEMENTATIONS[impl](q, k, v, causal=causal, kv_start=kv_start)
    assert out.grad_fn is None
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal, kv_start), atol=1e-4, rtol=1e-4)


def test_dispatch(monkeypatch):
    q = torch.zeros(1, 3, 2, 16)
    monkeypatch.setenv("KERNELS", "torch")
    assert not rlhf_kernels.use_triton(q)
    monkeypatch.setenv("KERNELS", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not rlhf_kernels.use_triton(q)  # plain CPU tensors use the PyTorch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rlhf_kernels.use_triton(q) == (rlhf_kernels.TRITON_AVAILABLE and rlhf_kernels.TRITON_INTERPRETED)
    if HAS_CUDA and rlhf_kernels.TRITON_AVAILABLE:
        assert rlhf_kernels.use_triton(q.cuda())


class HostSyncs:
    """Counts, inside its `with` block, the host syncs asked for: a tensor read as a Python bool,
    int or list."""

    NAMES = ("__bool__", "__int__", "item", "tolist")

    def __enter__(self):
        self.count = 0
        self.originals = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._counted(original))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def _counted(self, original):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return counted


def count_mask_builds(monkeypatch):
    """A list that grows by one each time the PyTorch path builds a boolean mask (causal or sliding window)."""
    import rlhf_kernels.attention as attention

    builds = []
    build, build_window = attention.visible_keys_mask, attention.AttentionMask._build_sliding_window_masks
    monkeypatch.setattr(attention, "visible_keys_mask", lambda *a, **k: builds.append(1) or build(*a, **k))
    monkeypatch.setattr(attention.AttentionMask, "_build_sliding_window_masks",
                        lambda *a, **k: builds.append(1) or build_window(*a, **k))
    return builds


@pytest.mark.parametrize("scenario", ["prefill", "chunked_prefill", "left_padding", "non_causal", "window"])
def test_one_attention_mask_for_every_layer(request, monkeypatch, scenario):
    """Calls sharing one AttentionMask (the layers of a forward pass) compute bit for bit what each
    would from kv_start alone, and the PyTorch path builds its masks for the first of them only."""
    monkeypatch.setenv("KERNELS", "torch")
    gen = rng_for(request)
    q, k, v, causal, kv_start = make_case(gen, "left_padding" if scenario == "window" else scenario, 2, torch.float32)
    if kv_start is None:
        kv_start = torch.tensor([draw(gen, 0, k.shape[1] - 1) for _ in range(q.shape[0])], device=DEVICE)
    window = 5 if scenario == "window" else None
    layers = [(q * scale, k, v * scale) for scale in (1.0, 0.5, 2.0)]
    fresh = [rlhf_kernels.flash_attention(*qkv, causal=causal, kv_start=kv_start, window=window) for qkv in layers]

    builds = count_mask_builds(monkeypatch)
    mask = rlhf_kernels.AttentionMask(kv_start)
    shared = [rlhf_kernels.flash_attention(*qkv, causal=causal, mask=mask, window=window) for qkv in layers]
    for got, want in zip(shared, fresh):
        assert torch.equal(got, want)
    assert len(builds) == 1
    with pytest.raises(ValueError, match="not both"):
        rlhf_kernels.flash_attention(q, k, v, kv_start=kv_start, mask=mask)


def test_decoding_mask_is_built_once_with_one_host_sync(request):
    """Decoding steps sharing one AttentionMask (one generate() call) slice one mask: no step syncs
    with the host once every row sees a key, and every step equals a call with kv_start alone."""
    gen = rng_for(request)
    batch, k_max = 3, 40
    kv_start = torch.tensor([2, 9, 5], device=DEVICE)
    q = torch.randn(batch, 1, 4, 16, generator=gen).to(DEVICE)
    k = torch.randn(batch, k_max, 2, 16, generator=gen).to(DEVICE)
    v = torch.randn(batch, k_max, 2, 16, generator=gen).to(DEVICE)
    first_all_see = int(kv_start.max()) + 1
    fresh = {k_len: rlhf_kernels.flash_attention_torch(q, k[:, :k_len], v[:, :k_len], kv_start=kv_start)
             for k_len in range(1, k_max + 1)}

    mask = rlhf_kernels.AttentionMask(kv_start, capacity=k_max)
    with HostSyncs() as syncs:
        steps = [rlhf_kernels.flash_attention_torch(q, k[:, :k_len], v[:, :k_len], mask=mask)
                 for k_len in range(first_all_see, k_max + 1) for _layer in range(3)]
    assert syncs.count == 1
    for i, out in enumerate(steps):
        assert torch.equal(out, fresh[first_all_see + i // 3])
    # While some row sees no key yet, the general path zeroes its output, as a call without a mask would.
    mask = rlhf_kernels.AttentionMask(kv_start, capacity=k_max)
    for k_len in range(1, k_max + 1):
        assert torch.equal(rlhf_kernels.flash_attention_torch(q, k[:, :k_len], v[:, :k_len], mask=mask), fresh[k_len])


def test_model_builds_masks_once_per_forward_and_generate_syncs_once(monkeypatch):
    """Transformer builds the masks once per forward (activation checkpointing's recomputation
    included), and generate()'s host syncs do not grow with the number of tokens."""
    from model import ModelArgs, Transformer

    monkeypatch.setenv("KERNELS", "torch")
    m = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=96)).to(DEVICE)
    m.init_weights(seed=0)
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0

    builds = count_mask_builds(monkeypatch)
    m.train()
    m.activation_checkpointing = True
    m(ids, mask, targets=ids).sum().backward()
    assert len(builds) == 1

    m.eval()
    for decode in ("eager", "static"):
        syncs = []
        for new in (2, 12):
            with HostSyncs() as counter:
                m.generate(ids, mask, max_new_tokens=new, generator=torch.Generator(device=DEVICE).manual_seed(0),
                           decode=decode)
            syncs.append(counter.count)
        assert syncs[0] == syncs[1], decode


@needs_cuda
@needs_triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_bf16_on_cuda(request, impl, group, scenario):
    gen = rng_for(request)
    check_against_reference(IMPLEMENTATIONS[impl], *make_case(gen, scenario, group, torch.bfloat16), gen)


@needs_cuda
@needs_triton
def test_bf16_long_sequence_head_dim_128_on_cuda(request):
    gen = rng_for(request)
    q = torch.randn(2, 1000, 8, 128, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(2, 1000, 2, 128, generator=gen).to(DEVICE, torch.bfloat16)
    v = torch.randn(2, 1000, 2, 128, generator=gen).to(DEVICE, torch.bfloat16)
    check_against_reference(rlhf_kernels.flash_attention_triton, q, k, v, True, torch.tensor([0, 300], device=DEVICE), gen)
