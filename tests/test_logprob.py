"""logprobs_from_logits and fused_linear_logprobs (Triton and PyTorch paths) against float64 log_softmax.

Without a GPU the Triton kernels run in Triton's interpreter (set up in
tests/kernel_testing.py); with a GPU the same tests run the compiled kernels on
CUDA. The tests call the `*_triton` and `*_torch` functions directly, whatever
KERNELS says.

Chunk sizes are shrunk so that even these small shapes span several vocabulary
tiles, row chunks and backward vocabulary chunks.
"""

import pytest
import torch

from kernel_testing import DEVICE, draw, needs_cuda, needs_triton, rlhf_kernels, rng_for, skip_if_triton_cannot_run

logprob_module = rlhf_kernels.logprob  # its chunk sizes are shrunk below

# (atol, rtol) for log-probs / entropy and for gradients, per input dtype. Half
# precision inputs are compared with float64 math on the same (rounded) inputs;
# the PyTorch path also rounds the logits to the input dtype, hence the fp16 slack.
TOLERANCES = {
    torch.float32: ((2e-5, 2e-5), (2e-5, 1e-4)),
    torch.float16: ((2e-2, 1e-2), (1e-2, 1e-2)),
    torch.bfloat16: ((1e-1, 5e-2), (5e-2, 5e-2)),
}
FROM_LOGITS = {"triton": rlhf_kernels.logprobs_from_logits_triton, "torch": rlhf_kernels.logprobs_from_logits_torch}
FUSED = {"triton": rlhf_kernels.fused_linear_logprobs_triton, "torch": rlhf_kernels.fused_linear_logprobs_torch}


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks in both paths even for tiny shapes."""
    monkeypatch.setattr(logprob_module, "CHUNK_ELEMENTS", 700)  # PyTorch path: a few rows per chunk
    monkeypatch.setattr(logprob_module, "BACKWARD_CHUNK_ELEMENTS", 2500)  # Triton backward: vocabulary chunks
    monkeypatch.setattr(logprob_module, "VOCAB_CHUNK_ALIGN", 32)


def draw_not_multiple(gen, low, high, of=16):
    n = draw(gen, low, high)
    return n + 1 if n % of == 0 else n


def reference_logp_entropy(logits, targets, temperature):
    """float64 log_softmax + gather, and the entropy -sum p log p."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


def assert_close(got, want, tol, what):
    atol, rtol = tol
    assert torch.isfinite(got).all(), f"{what} not finite"
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}\n{m}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("leading", ["flat", "batched"])
def test_logprobs_from_logits(request, small_chunks, impl, dtype, leading):
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    vocab = draw_not_multiple(gen, 40, 300, of=32)
    shape = (draw(gen, 3, 40),) if leading == "flat" else (draw(gen, 1, 3), draw(gen, 2, 13))
    temperature = [0.6, 1.0, 1.7][draw(gen, 0, 2)]
    logits = (3 * torch.randn(*shape, vocab, generator=gen)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=gen).to(DEVICE)
    what = f"logits {tuple(logits.shape)} {dtype} T={temperature}"
    (logp_tol, grad_tol) = TOLERANCES[dtype]

    logp = FROM_LOGITS[impl](logits, targets, temperature)
    assert logp.dtype == torch.float32 and logp.shape == shape
    grad_logp = torch.randn(shape, generator=gen).to(DEVICE)
    (grad_logits,) = torch.autograd.grad(logp, logits, grad_logp)
    assert grad_logits.dtype == dtype

    logits64 = logits.detach().double().requires_grad_()
    want, _ = reference_logp_entropy(logits64, targets, temperature)
    (want_grad,) = torch.autograd.grad(want, logits64, grad_logp.double())
    assert_close(logp, want, (1e-5, 1e-5), f"logp: {what}")  # fp32 math on exact inputs in every dtype
    assert_close(grad_logits, want_grad, grad_tol if dtype != torch.float32 else (1e-6, 1e-5), f"grad: {what}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("loss", ["logp", "entropy", "both"])
def test_fused_linear_logprobs(request, small_chunks, impl, dtype, loss):
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    rows, vocab, dim = draw_not_multiple(gen, 5, 45), draw_not_multiple(gen, 60, 260, of=32), draw_not_multiple(gen, 17, 48)
    temperature = [0.7, 1.0, 1.3][draw(gen, 0, 2)]
    shape = (rows,) if draw(gen, 0, 1) else (1, rows)  # also the [..., D] convenience form
    hidden = torch.randn(*shape, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (2 * dim**-0.5 * torch.randn(vocab, dim, generator=gen)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=gen).to(DEVICE)
    targets.view(-1)[0], targets.view(-1)[-1] = 0, vocab - 1  # edges of the vocabulary
    what = f"hidden {tuple(hidden.shape)} weight {tuple(weight.shape)} {dtype} T={temperature} loss={loss}"
    value_tol, grad_tol = TOLERANCES[dtype]

    grad_logp = torch.randn(shape, generator=gen).to(DEVICE)
    grad_entropy = torch.randn(shape, generator=gen).to(DEVICE)
    if loss == "logp":  # the default call returns log-probs only
        logp = FUSED[impl](hidden, weight, targets, temperature)
        entropy = None
        objective = (logp * grad_logp).sum()
    else:
        logp, entropy = FUSED[impl](hidden, weight, targets, temperature, return_entropy=True)
        objective = (entropy * grad_entropy).sum()
        if loss == "both":
            objective = objective + (logp * grad_logp).sum()
    assert logp.dtype == torch.float32 and logp.shape == shape
    grad_hidden, grad_weight = torch.autograd.grad(objective, (hidden, weight))
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype

    hidden64, weight64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    want_logp, want_entropy = reference_logp_entropy(hidden64 @ weight64.T, targets, temperature)
    want_objective = (want_entropy * grad_entropy.double()).sum() if loss != "logp" else 0.0
    if loss != "entropy":
        want_objective = want_objective + (want_logp * grad_logp.double()).sum()
    want_grad_hidden, want_grad_weight = torch.autograd.grad(want_objective, (hidden64, weight64))

    assert_close(logp, want_logp, value_tol, f"logp: {what}")
    if entropy is not None:
        assert_close(entropy, want_entropy, value_tol, f"entropy: {what}")
    assert_close(grad_hidden, want_grad_hidden, grad_tol, f"grad hidden: {what}")
    assert_close(grad_weight, want_grad_weight, grad_tol, f"grad weight: {what}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_peaked_distribution_and_no_grad(request, impl):
    """Large logits (near one-hot softmax) stay finite; works under no_grad for inference."""
    skip_if_triton_cannot_run(impl)
    gen = rng_for(request)
    hidden = (10 * torch.randn(23, 32, generator=gen)).to(DEVICE)
    weight = (10 * torch.randn(150, 32, generator=gen)).to(DEVICE)
    targets = torch.randint(0, 150, (23,), generator=gen).to(DEVICE)
    with torch.no_grad():
        logp, entropy = FUSED[impl](hidden, weight, targets, 1.0, return_entropy=True)
    assert logp.grad_fn is None
    want_logp, want_entropy = reference_logp_entropy(hidden.double() @ weight.double().T, targets, 1.0)
    assert_close(logp, want_logp, (1e-3, 1e-5), "logp")
    assert_close(entropy, want_entropy, (1e-3, 1e-4), "entropy")


@needs_triton  # else both calls take the PyTorch path
def test_dispatch_runs_both_paths_to_the_same_answer(request, monkeypatch):
    gen = rng_for(request)
    hidden = torch.randn(9, 24, generator=gen).to(DEVICE)
    weight = torch.randn(70, 24, generator=gen).to(DEVICE)
    targets = torch.randint(0, 70, (9,), generator=gen).to(DEVICE)
    monkeypatch.setenv("KERNELS", "torch")
    by_torch = rlhf_kernels.fused_linear_logprobs(hidden, weight, targets)
    monkeypatch.setenv("KERNELS", "auto")
    by_default = rlhf_kernels.fused_linear_logprobs(hidden, weight, targets)
    torch.testing.assert_close(by_default, by_torch, atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("loss", ["logp", "both"])
def test_bf16_on_cuda(request, impl, loss):
    gen = rng_for(request)
    rows, vocab, dim = 300, 5000, 256
    hidden = torch.randn(rows, dim, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = (dim**-0.5 * torch.randn(vocab, dim, generator=gen)).to(DEVICE, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    value_tol, grad_tol = TOLERANCES[torch.bfloat16]
    logp, entropy = FUSED[impl](hidden, weight, targets, 1.0, return_entropy=True)
    objective = logp.sum() + (entropy.sum() if loss == "both" else 0.0)
    grad_hidden, grad_weight = torch.autograd.grad(objective, (hidden, weight))

    hidden64, weight64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    want_logp, want_entropy = reference_logp_entropy(hidden64 @ weight64.T, targets, 1.0)
    want_objective = want_logp.sum() + (want_entropy.sum() if loss == "both" else 0.0)
    want_grad_hidden, want_grad_weight = torch.autograd.grad(want_objective, (hidden64, weight64))
    assert_close(logp, want_logp, value_tol, "logp")
    assert_close(entropy, want_entropy, value_tol, "entropy")
    assert_close(grad_hidden, want_grad_hidden, grad_tol, "grad hidden")
    assert_close(grad_weight, want_grad_weight, grad_tol, "grad weight")

    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(DEVICE, torch.bfloat16).requires_grad_()
    logp = FROM_LOGITS[impl](logits, targets, 0.8)
    (grad_logits,) = torch.autograd.grad(logp.sum(), logits)
    logits64 = logits.detach().double().requires_grad_()
    want, _ = reference_logp_entropy(logits64, targets, 0.8)
    (want_grad,) = torch.autograd.grad(want.sum(), logits64)
    assert_close(logp, want, (1e-4, 1e-4), "logp from logits")
    assert_close(grad_logits, want_grad, (1e-2, 2e-2), "grad logits")
