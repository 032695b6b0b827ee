"""model.py run end to end through the Triton kernels, the path every GPU run takes, against
transformers' LlamaForCausalLM (eager attention) on the same weights: logits on a left-padded
batch, the fused log-probs and every parameter's gradient, greedy KV-cache generation (prefill
with left padding, then one-query decode steps), and a mixed-precision forward and backward
under torch.autocast.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (fp32, and fp16 for
autocast: the interpreter's bf16 tl.dot is wrong); on a GPU the same tests run the compiled
kernels, with bf16 autocast. KERNELS=triton is set per test, so the dispatcher in rlhf_kernels/ picks
the kernels exactly as in a training run."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernel_testing import DEVICE, HAS_CUDA, rlhf_kernels, needs_triton  # noqa: E402
import hf_io  # noqa: E402
from hf_io import hf_name  # noqa: E402
from model import ModelArgs  # noqa: E402
from test_model import CONFIGS, hf_model_from_args, left_padded_batch  # noqa: E402

pytestmark = needs_triton
TRITON_CONFIGS = ["mha", "llama3_scaling", "tied"]  # head dim 16; GQA 1:1 and 4:1; tied output


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")


def ours_and_hf(tmp_path, name, seed):
    args = ModelArgs(**CONFIGS[name])
    hf = hf_model_from_args(args, seed=seed)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = hf_io.load_pretrained(tmp_path).to(DEVICE).eval()
    return ours, hf.to(DEVICE), args


def hf_token_logprobs(hf, ids, mask, targets):
    """float64 log p(targets) from transformers' logits (explicit positions for left padding)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    return torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1), logits


def hf_grads_by_our_names(ours, hf):
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        hf_p = hf_params["lm_head.weight" if name == "output.weight" else hf_name(name)]
        yield name, p.grad, hf_p.grad


@pytest.mark.parametrize("name", TRITON_CONFIGS)
def test_forward_logprobs_and_gradients_match_transformers(tmp_path, name):
    ours, hf, args = ours_and_hf(tmp_path, name, seed=11)
    ids, mask = left_padded_batch(args.vocab_size, [19, 7, 1, 12], seed=4)  # no length a block multiple
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    targets = torch.roll(ids, -1, dims=1)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE) * mask

    logp = ours(ids, mask, targets=targets)
    (logp * weights).sum().backward()
    ref_logp, hf_logits = hf_token_logprobs(hf, ids, mask, targets)
    (ref_logp * weights).sum().backward()

    keep = mask.bool()
    with torch.no_grad():
        ours_logits = ours(ids, mask)
    rel = (ours_logits[keep].double() - hf_logits[keep].double()).norm() / hf_logits[keep].double().norm()
    assert rel < 1e-5, f"logits: relative error {rel:.2e}"
    torch.testing.assert_close(logp[keep].double(), ref_logp[keep].detach(), rtol=1e-5, atol=1e-5)
    for param, ours_grad, hf_grad in hf_grads_by_our_names(ours, hf):
        rel = (ours_grad.double() - hf_grad.double()).norm() / hf_grad.double().norm()
        assert rel < 1e-4, f"{param}: gradient relative error {rel:.2e}"


@pytest.mark.parametrize("name", ["mha", "llama3_scaling"])
def test_greedy_generate_through_kernels_matches_transformers(tmp_path, name):
    ours, hf, args = ours_and_hf(tmp_path, name, seed=7)
    ids, mask = left_padded_batch(args.vocab_size, [5, 9, 2, 9], seed=3)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    eos, pad, new = 2, 0, 12
    ours_out = ours.generate(ids, mask, max_new_tokens=new, temperature=0, eos_id=eos, pad_id=pad)
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    n = hf_out.shape[1]
    assert torch.equal(ours_out[:, :n], hf_out)
    assert (ours_out[:, n:] == pad).all()


def test_autocast_forward_and_backward_through_kernels(tmp_path):
    # The single-GPU recipe: fp32 weights, bf16 autocast (fp16 in the interpreter). Projections
    # come out in the low dtype while RoPE's cos/sin follow the fp32 residual stream; the kernels
    # must still get q, k, v of one dtype, and the result must stay close to fp32 math.
    half = torch.bfloat16 if HAS_CUDA else torch.float16
    ours, hf, args = ours_and_hf(tmp_path, "llama3_scaling", seed=5)
    ids, mask = left_padded_batch(args.vocab_size, [17, 10, 3], seed=8)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    targets = torch.roll(ids, -1, dims=1)
    keep = mask.bool()

    with torch.autocast(DEVICE, dtype=half):
        logp, entropy = ours(ids, mask, targets=targets, return_entropy=True)
        (logp * mask).sum().backward()
        generated = ours.generate(ids, mask, max_new_tokens=4, temperature=0)
    ref_logp, _ = hf_token_logprobs(hf, ids, mask, targets)
    (ref_logp * mask).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32
    assert torch.isfinite(entropy[keep]).all() and generated.shape == (3, ids.shape[1] + 4)
    err = (logp[keep].double() - ref_logp[keep].detach()).abs().max()
    assert err < 0.05, f"log-probs under autocast off by {err:.3f} nats"
    for param, ours_grad, hf_grad in hf_grads_by_our_names(ours, hf):
        assert ours_grad.dtype == torch.float32, f"{param}: gradient in {ours_grad.dtype}"
        rel = (ours_grad.double() - hf_grad.double()).norm() / hf_grad.double().norm()
        assert rel < 0.05, f"{param}: gradient relative error {rel:.2e} under autocast"


def test_head_dim_without_a_kernel_falls_back_to_sdpa(tmp_path, monkeypatch):
    # gqa_theta has head dim 8: the dispatcher sends it to the PyTorch path, unless KERNELS=triton
    # forces the kernel, which then refuses it by name.
    ours, hf, args = ours_and_hf(tmp_path, "gqa_theta", seed=2)
    assert args.head_dim not in rlhf_kernels.TRITON_HEAD_DIMS
    ids, mask = left_padded_batch(args.vocab_size, [6, 11], seed=0)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    monkeypatch.setenv("KERNELS", "auto")
    with torch.no_grad():
        logits = ours(ids, mask)
        _, hf_logits = hf_token_logprobs(hf, ids, mask, ids)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], hf_logits[keep], rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("KERNELS", "triton")
    with pytest.raises(AssertionError, match="head dim 8"), torch.no_grad():
        ours(ids, mask)


def test_dispatcher_follows_the_documented_switches(monkeypatch):
    # rlhf_kernels/__init__.py's rules for CPU tensors: KERNELS=triton forces the kernels even without the
    # interpreter; TRITON_INTERPRET=1 set after the kernels were compiled (not interpreted) does not send
    # CPU tensors to them; KERNELS=torch wins over everything.
    q = torch.zeros(1, 3, 2, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("KERNELS", "triton")
    assert rlhf_kernels.use_triton(q)
    monkeypatch.setenv("KERNELS", "auto")
    assert not rlhf_kernels.use_triton(q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(rlhf_kernels, "TRITON_INTERPRETED", False)  # the kernels were defined compiled
    assert not rlhf_kernels.use_triton(q)
    monkeypatch.setattr(rlhf_kernels, "TRITON_INTERPRETED", True)
    assert rlhf_kernels.use_triton(q)
    monkeypatch.setenv("KERNELS", "torch")
    assert not rlhf_kernels.use_triton(q)
