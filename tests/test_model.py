"""model.py against transformers' LlamaForCausalLM on the same random weights, through safetensors
in both directions; generation against transformers' greedy generate; KV-cache decoding against
recomputing the whole sequence; checkpoint errors."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_io  # noqa: E402
import model  # noqa: E402
from model import ModelArgs, Transformer, end_scores, positions_from_mask, sample_token  # noqa: E402

CONFIGS = {
    # name: (our ModelArgs kwargs)
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=101, hidden_dim=96),
    "gqa_theta": dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=77, hidden_dim=160,
                      rope_theta=500000.0, norm_eps=1e-6),
    "llama3_scaling": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=64, hidden_dim=128,
                           rope_theta=500000.0, max_seq_len=512,
                           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "tied": dict(dim=32, n_layers=2, n_heads=2, vocab_size=50, hidden_dim=64, tie_embeddings=True),
}


def hf_model_from_args(args: ModelArgs, seed: int):
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope = {**args.rope_scaling, "rope_theta": args.rope_theta}
    config = transformers.LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps, rope_parameters=rope, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def left_padded_batch(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
        ids[i, :T - n] = 0
    return ids, mask


def hf_logits(hf, ids, mask):
    # HF takes positions explicitly for a left-padded forward (generate computes them the same way).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def assert_close_on_mask(ours, theirs, mask, rtol=1e-5):
    keep = mask.bool()
    a, b = ours[keep].double(), theirs[keep].double()
    rel = (a - b).norm() / b.norm()
    assert rel < rtol, f"relative error {rel:.2e}"
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_saves_we_load(tmp_path, name):
    args = ModelArgs(**CONFIGS[name])
    hf = hf_model_from_args(args, seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = hf_io.load_pretrained(tmp_path).eval()
    assert ours.args.rope_theta == args.rope_theta and ours.args.n_kv_heads == args.n_kv_heads
    for lengths in ([13], [7, 13, 1], [31, 5]):  # odd lengths, left padding, a 1-token prompt
        ids, mask = left_padded_batch(args.vocab_size, lengths, seed=len(lengths))
        with torch.no_grad():
            logits = ours(ids, mask)
        assert_close_on_mask(logits, hf_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_we_save_hf_loads(tmp_path, name):
    args = ModelArgs(**CONFIGS[name])
    torch.manual_seed(2)
    ours = Transformer(args).eval()
    ours.init_weights(std=0.05, seed=3)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf_io.save_pretrained(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids, mask = left_padded_batch(args.vocab_size, [9, 17, 4], seed=5)
    with torch.no_grad():
        logits = ours(ids, mask)
    assert_close_on_mask(logits, hf_logits(hf, ids, mask), mask)


def test_sharded_save_round_trip(tmp_path):
    args = ModelArgs(**CONFIGS["gqa_theta"])
    ours = Transformer(args).eval()
    ours.init_weights(seed=0)
    hf_io.save_pretrained(ours, tmp_path / "ckpt", max_shard_size=20_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    loads_as_transformers_loads_it(tmp_path / "ckpt", ours)


def loads_as_transformers_loads_it(folder, expected):
    """hf_io.load_pretrained(folder) gives transformers' logits on the same folder, and `expected`'s weights."""
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").float()
    back = hf_io.load_pretrained(folder)
    ids, mask = left_padded_batch(expected.args.vocab_size, [6, 11], seed=0)
    with torch.no_grad():
        assert_close_on_mask(back(ids, mask), hf_logits(hf, ids, mask), mask)
    for a, b in zip(expected.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_a_single_file_wins_over_an_index_beside_it(tmp_path):
    # A folder holding model.safetensors and, from an earlier sharded save, an index and its shards (other
    # weights): transformers reads model.safetensors, and so must we.
    args = ModelArgs(**CONFIGS["gqa_theta"])
    old, new = Transformer(args).eval(), Transformer(args).eval()
    old.init_weights(seed=0)
    new.init_weights(seed=1)
    hf_io.save_pretrained(old, tmp_path / "ckpt", max_shard_size=20_000)
    hf_io.save_pretrained(new, tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "ckpt" / "model.safetensors")
    loads_as_transformers_loads_it(tmp_path / "ckpt", new)


def test_right_padding_matches_unpadded():
    # Training batches are right-padded: real tokens must not depend on the pads after them.
    args = ModelArgs(**CONFIGS["gqa_theta"])
    m = Transformer(args).eval()
    m.init_weights(seed=0)
    ids = torch.randint(0, args.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        full = m(ids, mask)
        alone = m(ids[1:, :7])
    torch.testing.assert_close(full[1, :7], alone[0], rtol=1e-5, atol=1e-5)


def test_logprob_and_entropy_targets_match_logits():
    args = ModelArgs(**CONFIGS["mha"])
    m = Transformer(args).eval()
    m.init_weights(seed=0)
    ids, mask = left_padded_batch(args.vocab_size, [10, 6], seed=1)
    targets = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        logits = m(ids, mask).double() / 0.7
        lp, ent = m(ids, mask, targets=targets, temperature=0.7, return_entropy=True)
    ref_logp = torch.log_softmax(logits, -1)
    ref = ref_logp.gather(-1, targets[..., None]).squeeze(-1)
    ref_ent = -(ref_logp.exp() * ref_logp).sum(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("name", ["mha", "gqa_theta"])
def test_greedy_generate_matches_transformers(tmp_path, name, decode):
    args = ModelArgs(**CONFIGS[name])
    hf = hf_model_from_args(args, seed=7)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch(args.vocab_size, [5, 9, 2, 9], seed=3)
    eos, pad, new = 2, 0, 24
    ours_out = ours.generate(ids, mask, max_new_tokens=new, temperature=0, eos_id=eos, pad_id=pad, decode=decode)
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    assert ours_out.shape == (4, ids.shape[1] + new)
    n = hf_out.shape[1]
    assert torch.equal(ours_out[:, :n], hf_out)
    assert (ours_out[:, n:] == pad).all()  # HF stops early once every row has finished


def test_generate_pads_after_eos_and_stops():
    args = ModelArgs(**CONFIGS["mha"])
    m = Transformer(args).eval()
    m.init_weights(std=0.2, seed=0)
    ids, mask = left_padded_batch(args.vocab_size, [4, 6, 5], seed=0)
    free = m.generate(ids, mask, max_new_tokens=10, temperature=0)  # no EOS: 10 tokens each
    eos = int(free[0, 6 + 2])  # row 0 emits this token at its 3rd step: call it EOS
    out = m.generate(ids, mask, max_new_tokens=10, temperature=0, eos_id=eos, pad_id=0)
    assert out.shape == (3, 16)
    for row in range(3):
        hits = (free[row, 6:] == eos).nonzero()
        stop = 6 + int(hits[0]) + 1 if len(hits) else 16  # one past the row's first EOS
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == 0).all()


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generated_tokens_feed_a_training_step(decode):
    """generate() decodes in inference mode; what it returns must still be an ordinary tensor, as
    PPO edits it in place (masks, slicing) and trains on it: an inference tensor would raise here
    ("Inference tensors cannot be saved for backward", "Inplace update to inference tensor")."""
    args = ModelArgs(**CONFIGS["gqa_theta"])
    m = Transformer(args)
    m.init_weights(seed=0)
    ids, mask = left_padded_batch(args.vocab_size, [3, 5], seed=1)
    out = m.eval().generate(ids, mask, max_new_tokens=4, eos_id=[1, 2], decode=decode,
                            generator=torch.Generator().manual_seed(0))
    assert not out.is_inference()
    out[:, -1] = 3
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    logprobs = m.train()(out[:, :-1], full_mask[:, :-1], targets=out[:, 1:])
    logprobs.sum().backward()
    assert m.tok_embeddings.weight.grad is not None and m.tok_embeddings.weight.grad.abs().sum() > 0


def test_pad_equal_to_eos_in_generation_masks_and_end_scores(tmp_path):
    # Qwen's releases pad with an EOS id. Generation pads after each row's EOS with that same id: the tokens
    # must equal transformers' generate with pad_token_id = eos_token_id, the generation mask must end at the
    # first EOS (the padding after it is EOS too), and end scores must be read there, as for each answer alone.
    from model import generation_mask

    args = ModelArgs(**CONFIGS["gqa_theta"])
    hf = hf_model_from_args(args, seed=7)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch(args.vocab_size, [5, 9, 2, 9], seed=3)
    free = ours.generate(ids, mask, max_new_tokens=12, temperature=0)[:, ids.shape[1]:]
    early = torch.stack([torch.zeros(args.vocab_size).index_fill(0, row[:8], 1) for row in free]).sum(0)
    eos = int(early.argmax())  # the token most rows emit within 8 steps: most end early
    ids = ids.masked_fill(mask == 0, eos)  # the prompts' left padding is the EOS id too
    out = ours.generate(ids, mask, max_new_tokens=12, temperature=0, eos_id=eos, pad_id=eos)
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(out[:, :hf_out.shape[1]], hf_out) and (out[:, hf_out.shape[1]:] == eos).all()
    full = generation_mask(out, mask, eos)
    T, ended = ids.shape[1], 0
    for row in range(len(ids)):
        response = out[row, T:].tolist()
        n = response.index(eos) + 1 if eos in response else len(response)  # up to and including the first EOS
        ended += eos in response and n < len(response)
        assert full[row].tolist() == mask[row].tolist() + [1] * n + [0] * (len(response) - n)
    assert ended >= 2  # rows whose last real token is the EOS, followed by EOS padding
    scorer = hf_io.load_pretrained(tmp_path, head="score").eval()
    with torch.no_grad():
        scores = end_scores(scorer(out, full), full)
        for row in range(len(ids)):
            alone = out[row][full[row].bool()][None]
            assert float(scores[row]) == pytest.approx(float(scorer(alone)[0, -1]), abs=1e-5)


def test_kv_cache_decoding_equals_full_recompute():
    args = ModelArgs(**CONFIGS["gqa_theta"])
    m = Transformer(args).eval()
    m.init_weights(std=0.1, seed=0)
    ids, mask = left_padded_batch(args.vocab_size, [3, 8, 6], seed=2)
    g = torch.Generator().manual_seed(0)
    out = m.generate(ids, mask, max_new_tokens=12, temperature=1.0, generator=g)  # no eos: all tokens real
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], 1)
    # Replay the cached decode step by step and compare its logits with a full forward pass.
    from model import AttentionMask, KVCache, rope_cos_sin, rope_inv_freq

    positions, kv_start = positions_from_mask(out, full_mask)
    caches = [KVCache(3, out.shape[1]) for _ in m.layers]
    attn_mask = AttentionMask(kv_start, capacity=out.shape[1])
    T = ids.shape[1]
    with torch.no_grad():
        full = m(out, full_mask)
        inv_freq = rope_inv_freq(m.args, out.device)

        def cos_sin(positions):
            return rope_cos_sin(inv_freq, positions, torch.float32)

        step_logits = [m._forward_cached(out[:, :T], cos_sin(positions[:, :T]), attn_mask, caches, 0)]
        for t in range(T, out.shape[1] - 1):
            step_logits.append(m._forward_cached(out[:, t:t + 1], cos_sin(positions[:, t:t + 1]), attn_mask, caches, t))
    cached = torch.stack(step_logits, 1)
    torch.testing.assert_close(cached, full[:, T - 1:-1], rtol=1e-5, atol=1e-5)


def test_sampler_top_p_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_token(logits, 1.0, 1.0, g), minlength=4).double() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.double), atol=0.015, rtol=0)
    # top_p = 0.7 keeps {0.5, 0.3} (0.5 alone is below 0.7), renormalised to 0.625 / 0.375
    counts = torch.bincount(sample_token(logits, 1.0, 0.7, g), minlength=4).double() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.double), atol=0.015, rtol=0)
    assert (sample_token(logits[:3], 0.0, 1.0) == 0).all()


def test_score_model_from_lm_checkpoint_and_round_trip(tmp_path):
    args = ModelArgs(**CONFIGS["mha"])
    lm = Transformer(args)
    lm.init_weights(seed=0)
    hf_io.save_pretrained(lm, tmp_path / "lm")
    rm = hf_io.load_pretrained(tmp_path / "lm", head="score")
    assert rm.head == "score" and torch.equal(rm.score_head.bias, torch.zeros(1))
    torch.testing.assert_close(rm.layers[1].attention.wk.weight, lm.layers[1].attention.wk.weight)
    rm.score_stats = {"mean": 0.5, "std": 2.0}
    hf_io.save_pretrained(rm, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForScore"] and config["score_stats"]["std"] == 2.0
    back = hf_io.load_pretrained(tmp_path / "rm")
    assert back.head == "score" and back.score_stats == {"mean": 0.5, "std": 2.0}
    ids, mask = left_padded_batch(args.vocab_size, [4, 7], seed=0)
    with torch.no_grad():
        s = back(ids, mask)
        # The score is a linear function of the final hidden state: check against the body by hand.
        h = rm.hidden_states(ids, mask)
    ref = h.double() @ rm.score_head.weight.double()[0] + rm.score_head.bias.double()
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-6)
    # end score: the last real token of each row (left-padded => the last column)
    torch.testing.assert_close(end_scores(s, mask), s[:, -1])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(end_scores(torch.arange(8.).view(2, 4), right), torch.tensor([2.0, 7.0]))
    with pytest.raises(ValueError, match="score model"):
        hf_io.load_pretrained(tmp_path / "rm", head="lm")
    # The fresh head depends on its seed alone, not on the global RNG: the same on every rank and in every run.
    torch.manual_seed(1)
    a = hf_io.load_pretrained(tmp_path / "lm", head="score", seed=5).score_head.weight
    torch.manual_seed(2)
    b = hf_io.load_pretrained(tmp_path / "lm", head="score", seed=5).score_head.weight
    assert torch.equal(a, b) and not torch.equal(a, hf_io.load_pretrained(tmp_path / "lm", head="score", seed=6).score_head.weight)


def test_tied_lm_checkpoint_starts_a_score_model(tmp_path):
    # Tied checkpoints (Qwen2.5-0.5B, Llama-3.2-1B) as reward or cost models: the LM head, which is the
    # embedding, is dropped; the score model has none to load it into.
    lm = Transformer(ModelArgs(**CONFIGS["tied"]))
    lm.init_weights(seed=0)
    hf_io.save_pretrained(lm, tmp_path / "lm")
    rm = hf_io.load_pretrained(tmp_path / "lm", head="score")
    assert rm.head == "score" and "output.weight" not in rm.state_dict()
    assert torch.equal(rm.tok_embeddings.weight, lm.tok_embeddings.weight)


def test_meta_device_init_then_init_weights():
    args = ModelArgs(**CONFIGS["mha"])
    with torch.device("meta"):
        m = Transformer(args)
    assert m.tok_embeddings.weight.is_meta
    m.to_empty(device="cpu")
    m.init_weights(seed=1)
    assert torch.isfinite(m(torch.randint(0, 101, (1, 5)))).all()
    assert abs(m.layers[0].feed_forward.w1.weight.std().item() - 0.02) < 0.004


def test_presets():
    a = ModelArgs.from_name("llama-3-8b")
    assert (a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size) == (8, 128, 14336, 128256)
    assert ModelArgs.from_name("llama-7b").hidden_dim == 11008
    assert 0.9e6 < Transformer(ModelArgs.from_name("tiny")).num_params() < 1.2e6
    with pytest.raises(KeyError, match="unknown model preset"):
        ModelArgs.from_name("gpt5")


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    m = Transformer(ModelArgs(**CONFIGS["mha"]))
    m.init_weights(seed=0)
    hf_io.save_pretrained(m, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_error_missing_dir_and_config(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_pretrained(tmp_path / "nope")
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.load_pretrained(saved)


def test_error_malformed_config(saved):
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        hf_io.load_pretrained(saved)


def test_error_config_missing_key(saved):
    config = json.loads((saved / "config.json").read_text())
    del config["hidden_size"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"config.json.*'hidden_size'"):
        hf_io.load_pretrained(saved)


def test_error_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(saved / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved / "model.safetensors")
    with pytest.raises(KeyError, match=r"model.layers.1.mlp.up_proj.weight"):
        hf_io.load_pretrained(saved)


def test_error_wrong_shape(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(saved / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors.*k_proj.weight.*shape \(3, 64\)"):
        hf_io.load_pretrained(saved)
    # the same number of values, transposed (an [in, out] layout): refused too, not read in the wrong order
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].t().contiguous()
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight.*shape \(64, 96\), expected \(96, 64\)"):
        hf_io.load_pretrained(saved)


def test_rope_tables_of_older_checkpoints_are_skipped(saved):
    # transformers before 4.31 saved each layer's RoPE inv_freq buffer; such a checkpoint loads, the table unread.
    from safetensors.torch import load_file, save_file

    state = load_file(saved / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, saved / "model.safetensors")
    model = hf_io.load_pretrained(saved)
    assert torch.equal(model.layers[0].attention.wq.weight, state["model.layers.0.self_attn.q_proj.weight"])


def test_error_pickle_only_and_mask_hole(tmp_path, saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        hf_io.load_pretrained(saved)
    m = Transformer(ModelArgs(**CONFIGS["tied"]))
    with pytest.raises(ValueError, match="hole"):
        m(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]))


def test_generation_mask():
    from model import generation_mask

    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    seq = torch.tensor([[0, 5, 6, 7, 2, 0, 0], [4, 5, 6, 7, 8, 9, 3]])  # EOS = 2; row 1 has none
    mask = generation_mask(seq, prompt_mask, eos_id=2)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]


def test_noise_rows_make_samples_independent_of_the_split():
    """Sampling a batch whole or in two halves (as two ranks would) gives the same tokens when the
    noise is drawn for the whole batch and sliced."""
    args = ModelArgs(**CONFIGS["mha"])
    m = Transformer(args).eval()
    m.init_weights(std=0.2, seed=0)
    ids, mask = left_padded_batch(args.vocab_size, [5, 7, 3, 7], seed=1)

    def sample(rows, offset):
        g = torch.Generator().manual_seed(123)
        return m.generate(ids[rows], mask[rows], max_new_tokens=8, generator=g, noise_rows=(offset, 4))

    whole = sample(slice(0, 4), 0)
    halves = torch.cat([sample(slice(0, 2), 0), sample(slice(2, 4), 2)])
    assert torch.equal(whole, halves)
    plain = m.generate(ids[2:4], mask[2:4], max_new_tokens=8, generator=torch.Generator().manual_seed(123))
    assert not torch.equal(plain, whole[2:4])  # without noise_rows the halves would draw other noise


@pytest.mark.parametrize("config", [CONFIGS["gqa_theta"], CONFIGS["tied"],
                                    dict(CONFIGS["mha"], qkv_bias=True, family="qwen2"),
                                    dict(CONFIGS["llama3_scaling"], sliding_window=6, family="mistral")],
                         ids=["gqa", "tied", "qkv_bias", "sliding_window"])
def test_static_decoding_step_samples_the_eager_tokens(config):
    """The static step (whole cache + mask, the step index a tensor: what a CUDA graph replays)
    draws the very tokens of the eager step from the same generator, bit for bit: sampled at
    temperature 1 and with top-p, with an EOS ending some rows, left padding (one row with a
    single real token) and noise_rows. A window of 6 is passed within the 20 new tokens."""
    args = ModelArgs(**config)
    m = Transformer(args).eval()
    m.init_weights(std=0.3, seed=0)  # large weights: peaked, varied distributions
    with torch.no_grad():  # nonzero q/k/v biases where the family has them
        for layer in m.layers:
            for proj in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ids, mask = left_padded_batch(args.vocab_size, [5, 9, 1, 7], seed=4)
    for temperature, top_p in ((1.0, 1.0), (0.8, 0.9)):
        def sample(decode):
            g = torch.Generator().manual_seed(5)
            return m.generate(ids, mask, max_new_tokens=20, temperature=temperature, top_p=top_p, eos_id=[2, 3],
                              pad_id=0, generator=g, noise_rows=(1, 6), decode=decode)
        eager, static = sample("eager"), sample("static")
        assert torch.equal(static, eager)
        assert len(set(eager[:, ids.shape[1]:].flatten().tolist())) > 5  # a sample, not one repeated token


def test_decode_modes_are_checked(monkeypatch):
    m = Transformer(ModelArgs(**CONFIGS["mha"])).eval()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="decode must be one of auto, eager, static, graph"):
        m.generate(ids, max_new_tokens=2, decode="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        m.generate(ids, max_new_tokens=2, decode="graph")
    g = torch.Generator().manual_seed(0)
    eager = m.generate(ids, max_new_tokens=4, generator=g, decode="eager")

    def no_static_step(*args, **kwargs):
        raise AssertionError("auto built a static decoding step on a CPU")
    monkeypatch.setattr(model, "StaticDecodeStep", no_static_step)
    auto = m.generate(ids, max_new_tokens=4, generator=g.manual_seed(0))  # "auto" is the eager step on a CPU
    assert torch.equal(auto, eager)
    with pytest.raises(AssertionError, match="static decoding step"):  # and "static" does build one
        m.generate(ids, max_new_tokens=4, decode="static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_samples_the_eager_tokens(dtype):
    """On a GPU, the captured step (decode='graph', "auto"'s choice there) replays the static
    step's kernels: the same tokens from the same generator, bit for bit, in fp32 and in bf16 under
    autocast (as ppo_lag.py samples without FSDP). In fp32 the static step also samples the eager
    step's tokens (bf16 attention over the whole cache rounds differently from the Triton kernel
    over its filled part)."""
    args = ModelArgs(**CONFIGS["gqa_theta"])
    m = Transformer(args).cuda().eval()
    m.init_weights(std=0.3, seed=0)
    ids, mask = (t.cuda() for t in left_padded_batch(args.vocab_size, [5, 9, 1, 7], seed=4))

    def sample(decode):
        g = torch.Generator(device="cuda").manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return m.generate(ids, mask, max_new_tokens=24, eos_id=2, generator=g, decode=decode)
    static = sample("static")
    assert torch.equal(sample("graph"), static)
    assert torch.equal(sample("auto"), static)
    if dtype == torch.float32:
        assert torch.equal(static, sample("eager"))


def test_activation_checkpointing_gives_the_same_gradients():
    args = ModelArgs(**CONFIGS["gqa_theta"])
    m = Transformer(args)
    m.init_weights(seed=0)
    ids, mask = left_padded_batch(args.vocab_size, [9, 5], seed=0)
    grads = []
    for checkpointing in (False, True):
        m.zero_grad()
        m.activation_checkpointing = checkpointing
        m(ids, mask, targets=torch.roll(ids, -1, 1)).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- half precision, temperature, positions, tied and bf16 saves: paths the tests above do not reach ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rmsnorm_in_half_precision_matches_transformers(dtype):
    """A model loaded in bf16/fp16 (a checkpoint's own dtype) takes RMSNorm's half-precision path, which
    the fp32 tests never run: normalise in fp32, round to the input dtype, then multiply by the weight, as
    transformers' LlamaRMSNorm does (bit for bit), with eps inside the square root (rows of tiny values,
    whose mean square is far below eps, show where eps sits)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 3e-3, 1.0, 30.0]).repeat_interleave(8)[:, None]  # [32, 1]: one scale per row
    x = (torch.randn(32, 64, generator=g) * scales).to(dtype)
    weight = (1 + 0.5 * torch.randn(64, generator=g)).to(dtype)
    ours, theirs = model.RMSNorm(64, eps=1e-5).to(dtype), LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        got, want = ours(x), theirs(x)
    assert got.dtype == dtype
    assert torch.equal(got, want), f"{(got != want).sum()} of {got.numel()} elements differ"


def test_sampler_applies_the_temperature_with_and_without_top_p():
    """Temperature scales the logits before nucleus filtering: probabilities p become p^(1/T) / Z, then
    top-p keeps the smallest prefix of the sorted tokens holding top_p of that (tempered) mass.
    p = (0.5, 0.3, 0.15, 0.05), T = 0.5: p^2 / Z = (0.25, 0.09, 0.0225, 0.0025) / 0.365
    = (0.6849, 0.2466, 0.0616, 0.0068); with top_p = 0.9 tokens 0 and 1 (0.6849 < 0.9, 0.9315 > 0.9)
    are kept, renormalised to (0.25, 0.09) / 0.34 = (0.7353, 0.2647)."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(1)

    def frequencies(temperature, top_p):
        return torch.bincount(sample_token(logits, temperature, top_p, g), minlength=4).double() / len(logits)

    tempered = torch.tensor([0.25, 0.09, 0.0225, 0.0025], dtype=torch.double) / 0.365
    torch.testing.assert_close(frequencies(0.5, 1.0), tempered, atol=0.015, rtol=0)
    torch.testing.assert_close(frequencies(0.5, 0.9), torch.tensor([0.25, 0.09, 0, 0], dtype=torch.double) / 0.34,
                               atol=0.015, rtol=0)


def test_positions_from_mask_by_hand():
    """RoPE positions count from each row's first real token (as transformers' generate computes them,
    cumsum(mask) - 1); kv_start is the number of left pads, and None when no row is left-padded."""
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    positions, kv_start = positions_from_mask(ids, mask)
    real = mask.bool()  # a pad's position is never used
    assert positions[real].tolist() == [0, 1, 2] + [0, 1, 2, 3, 4] + [0, 1, 2]
    assert kv_start.tolist() == [2, 0, 1]
    positions, kv_start = positions_from_mask(ids, torch.tensor([[1, 1, 1, 0, 0]] * 3))
    assert positions.tolist() == [[0, 1, 2, 2, 2]] * 3 and kv_start is None


def test_tied_checkpoint_has_transformers_tensors_and_loads_back_tied(tmp_path):
    """A tied model is saved as transformers saves one (the embedding once, no lm_head.weight), and what
    we save we load back, with the output weight again the embedding Parameter itself."""
    from safetensors import safe_open

    args = ModelArgs(**CONFIGS["tied"])
    hf = hf_model_from_args(args, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_io.load_pretrained(tmp_path / "hf").eval()
    hf_io.save_pretrained(ours, tmp_path / "ours")

    def keys(folder):
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return set(f.keys())
    assert keys(tmp_path / "ours") == keys(tmp_path / "hf") and "lm_head.weight" not in keys(tmp_path / "ours")
    back = hf_io.load_pretrained(tmp_path / "ours").eval()
    assert back.output.weight is back.tok_embeddings.weight
    ids, mask = left_padded_batch(args.vocab_size, [6, 9], seed=1)
    with torch.no_grad():
        assert_close_on_mask(back(ids, mask), hf_logits(hf, ids, mask), mask)


def test_save_in_another_dtype(tmp_path):
    """save_pretrained(dtype=bf16) of an fp32 model (how training.py writes its products) writes bf16 tensors,
    each the fp32 parameter rounded to bf16, and says so in config.json; transformers loads it as bf16."""
    from safetensors import safe_open

    args = ModelArgs(**CONFIGS["mha"])
    ours = Transformer(args)
    ours.init_weights(seed=0)
    hf_io.save_pretrained(ours, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    params = {hf_io.hf_name(n): p for n, p in ours.state_dict().items()}
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(params)
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.bfloat16, key
            assert torch.equal(tensor, params[key].to(torch.bfloat16)), key
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
