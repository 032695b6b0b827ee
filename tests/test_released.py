"""Released checkpoints exactly as they ship, through every stage.

The tokenizer files are the releases' own vocabularies, taken from the package registry and laid out as
each release ships its folder (tests/released.py: tokenizer.json / tokenizer.model, tokenizer_config.json
with its special tokens, pad and chat template, generation_config.json with its EOS list, config.json at
the real vocabulary size); the weights are tiny and random, saved by transformers in bf16. Nothing here
was written to suit this project: Qwen2.5 pads with an EOS id, no release records a template.

    test_release_through_every_stage    sft -> reward -> cost -> ppo_lag (2 iterations) -> evaluate, for each
                                        release x template; the product loads alone in transformers (model,
                                        tokenizer, chat template) with the same token ids

One cell per release family (Llama-3, Qwen2.5, Mistral, Llama-2) runs by default; the rest are marked
`released_full` (run them with
`pytest -m released_full`, or everything with `pytest -m "slow or not slow"`).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")  # the chat templates
sys.path.insert(0, str(Path(__file__).resolve().parent))

import released  # noqa: E402
from test_model import assert_close_on_mask, hf_logits  # noqa: E402
from test_stages import log_of  # noqa: E402

import hf_io  # noqa: E402
from data.tokenizer import Tokenizer, encode_dialogue, encode_prompt, format_prompt  # noqa: E402

FAMILY = {"llama-3.2-1b-instruct": "llama", "llama-3.2-1b": "llama", "qwen2.5-7b-instruct": "qwen2",
          "qwen2.5-7b": "qwen2", "mistral-7b-instruct-v0.3": "mistral", "llama-2-7b-chat": "llama"}
# One cell per family in the default run: the instruct models in their own chat format, Qwen's base release
# (pad = its EOS, and a chat template whose end of turn is not its EOS) and Llama-2 on the authors' template
# (its tokenizer.model beside a tokenizer.json).
DEFAULT_CELLS = {("llama-3.2-1b-instruct", "chat"), ("qwen2.5-7b", "chat"), ("mistral-7b-instruct-v0.3", "chat"),
                 ("llama-2-7b-chat", "safe_rlhf")}
CELLS = [pytest.param(name, template, marks=[] if (name, template) in DEFAULT_CELLS else [pytest.mark.released_full])
         for name in FAMILY for template in ("chat", "safe_rlhf")]
PROMPT, RESPONSE = "How do I bake bread?", "Mix flour, water and yeast, then bake it."


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """name -> a folder as the release ships it (tiny random bf16 weights), built once per session."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = released.need(released.released_checkpoint, name, tmp_path_factory.mktemp(name))
        return made[name]
    return get


def test_same_vocabulary_is_one_tokenizer_and_another_family_is_refused():
    """training.check_same_tokenizer on the releases' own files: a base release and its instruct one (other
    special tokens, chat template, EOS) and a folder's tokenizer.json against its tokenizer.model are the same
    vocabulary, never refused; a model of another family beside them is."""
    from training import check_same_tokenizer

    folder = {name: released.need(released.released_tokenizer, name) for name in FAMILY}
    for base, instruct in (("llama-3.2-1b", "llama-3.2-1b-instruct"), ("qwen2.5-7b", "qwen2.5-7b-instruct")):
        check_same_tokenizer(Tokenizer(folder[base]), folder[instruct])
        check_same_tokenizer(Tokenizer(folder[instruct]).for_template("chat"), folder[base])
    for name in ("mistral-7b-instruct-v0.3", "llama-2-7b-chat"):  # --tokenizer <folder>/tokenizer.model
        check_same_tokenizer(Tokenizer(folder[name] / "tokenizer.model"), folder[name])
    for name, other in (("llama-3.2-1b-instruct", "qwen2.5-7b"), ("llama-2-7b-chat", "mistral-7b-instruct-v0.3")):
        with pytest.raises(ValueError, match=f"{folder[other]} was trained with another tokenizer"):
            check_same_tokenizer(Tokenizer(folder[name]), folder[name], folder[other])


# transformers >= 5 rebuilds a LlamaTokenizer's pipeline instead of reading the release's tokenizer.json, and for
# Llama-2's legacy file (a Prepend normalizer: every text after a special token starts a word) that changes ids:
# "<s>[INST]" is [1, 518 ▁[, ...] in Meta's format, in sentencepiece and in the file, [1, 29961 [, ...] in
# transformers 5. There the reference is sentencepiece on the release's tokenizer.model (Meta's own tokenizer).
SENTENCEPIECE_REFERENCE = {"llama-2-7b-chat"}


def reference_ids(name, folder, hf, text):
    """`text` (special tokens written out, as a chat template renders them) as the release tokenizes it."""
    if name not in SENTENCEPIECE_REFERENCE:
        return hf.encode(text, add_special_tokens=False)
    import re

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = []
    for piece in re.split(r"(<s>|</s>)", text):
        ids += [sp.piece_to_id(piece)] if piece in ("<s>", "</s>") else sp.encode(piece) if piece else []
    return ids


def check_dialogue_ids(name, folder, hf, tok, template):
    """Our prompt + response + end ids against the release's tokenizer on the text transformers renders:
    apply_chat_template (with the generation prompt for the prompt part), or the authors' template. The
    response follows the prompt, and our end token is the first special token the template writes after it
    (a template may write more: Qwen a newline after <|im_end|>, Llama-2 a space before </s>)."""
    ids, n_prompt = encode_dialogue(tok, PROMPT, RESPONSE, template)
    response = tok.encode(RESPONSE)
    assert ids == encode_prompt(tok, PROMPT, template) + response + [tok.eos_id]
    if template == "chat":
        user, answer = {"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}
        day = {"date_string": "26 Jul 2024"}  # the date our chat templates print (Llama-3.2's), transformers' today's
        prompt_text = hf.apply_chat_template([user], add_generation_prompt=True, tokenize=False, **day)
        full = reference_ids(name, folder, hf, hf.apply_chat_template([user, answer], tokenize=False, **day))
        assert ids[:n_prompt] == reference_ids(name, folder, hf, prompt_text)
    else:  # the text with the BOS transformers' encode adds; the response encoded on its own (data/tokenizer.py
        # says why), then the EOS
        bos = [hf.bos_token_id] if tok.add_bos else []
        prompt = hf.encode(format_prompt(PROMPT)) if name not in SENTENCEPIECE_REFERENCE else \
            bos + reference_ids(name, folder, hf, format_prompt(PROMPT))
        assert ids[:n_prompt] == prompt
        full = prompt + reference_ids(name, folder, hf, RESPONSE) + [hf.eos_token_id]  # transformers' eos_token
    assert full[:n_prompt] == ids[:n_prompt] and full[n_prompt:n_prompt + len(response)] == response
    special = set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert next(i for i in full[n_prompt + len(response):] if i in special) == tok.eos_id
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("name, template", CELLS)
def test_release_through_every_stage(tmp_path, synthetic_data, checkpoint, name, template):
    import evaluate
    import ppo_lag
    import sft
    import train_score

    task, base = synthetic_data, checkpoint(name)
    small = ["--template", template, "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "160"]
    if template == "chat" and Tokenizer(base).chat_template is None:  # Llama-3.2 base ships none: one clear line
        with pytest.raises(ValueError, match="no chat template .* use --template safe_rlhf"):
            sft.main(["--model", str(base), "--data", f"{task.sft_train}:8", "--out", str(tmp_path / "sft"), *small])
        return
    tok = Tokenizer(base).for_template(template)
    sft.main(["--model", str(base), "--data", f"{task.sft_train}:8", "--eval-data", f"{task.sft_eval}:4",
              "--max-steps", "1", "--out", str(tmp_path / "sft"), *small])
    policy = tmp_path / "sft" / "model"
    # The later stages are not told the template: they take the one the SFT model recorded (the actor's
    # record below says which they used).
    for objective in ("reward", "cost"):
        train_score.main(["--objective", objective, "--model", str(policy), "--data", f"{task.preference_train}:8",
                          "--eval-data", f"{task.preference_eval}:4", "--max-steps", "1",
                          "--out", str(tmp_path / objective), *small[2:]])
    scorers = ["--reward-model", str(tmp_path / "reward" / "model"), "--cost-model", str(tmp_path / "cost" / "model")]
    ppo_lag.main(["--actor", str(policy), *scorers, "--prompts", f"{task.ppo_prompts}:8",
                  "--ptx-data", f"{task.sft_train}:8", "--max-new-tokens", "6", "--max-steps", "2",
                  "--out", str(tmp_path / "ppo"), *small[2:]])
    actor = tmp_path / "ppo" / "actor"
    assert len(log_of(tmp_path / "ppo")) == 2
    # evaluate.py: the release as downloaded (no record: the template comes from the product's record) and
    # the product, side by side.
    results = evaluate.main(["--models", str(base), str(actor), *scorers, "--prompts", f"{task.eval_prompts}:8",
                             "--samples-per-prompt", "1", "--max-new-tokens", "6", "--out", str(tmp_path / "eval")])
    assert set(results) == {str(base), str(actor)}

    # The product is a drop-in replacement of the release: its family, dtype, tokenizer files, template record.
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json"):
        assert (actor / f).is_file() == (base / f).is_file(), f
    config = json.loads((actor / "config.json").read_text())
    assert (config["model_type"], config["torch_dtype"], config["template"]) == \
        (FAMILY[name], released.RELEASES[name].dtype, template)
    assert config["tie_word_embeddings"] == json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    # ... and transformers reads it alone: the model (same logits), the tokenizer (same ids, same pad and
    # EOS), the chat template, and a generation config that stops where our responses end.
    hf_tok = transformers.AutoTokenizer.from_pretrained(actor)
    ours = Tokenizer(actor).for_template(template)
    assert (ours.eos_id, ours.eos_ids, ours.pad_id) == (tok.eos_id, tok.eos_ids, tok.pad_id)
    if hf_tok.pad_token_id is not None:  # the release configures one (Qwen): the same, even though it is an EOS
        assert ours.pad_id == hf_tok.pad_token_id
    ids = check_dialogue_ids(name, actor, hf_tok, ours, template)
    stop = transformers.GenerationConfig.from_pretrained(actor).eos_token_id
    assert ours.eos_id in (stop if isinstance(stop, list) else [stop])
    hf = transformers.AutoModelForCausalLM.from_pretrained(actor, attn_implementation="eager").float().eval()
    batch = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    mine = hf_io.load_pretrained(actor, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_on_mask(mine(*batch), hf_logits(hf, *batch), batch[1])

    # Templates: only recorded ones are compared. The product now records its template, so the other one is
    # refused, and so is mixing score models trained with another template.
    other = {"chat": "safe_rlhf", "safe_rlhf": "chat"}[template]
    with pytest.raises(ValueError, match=f"was trained with --template {template}; pass --template {template}"):
        sft.main(["--model", str(actor), "--data", f"{task.sft_train}:8", "--out", str(tmp_path / "refused"),
                  *small[:1], other, *small[2:]])
    mixed = tmp_path / "mixed_cost_model"
    mixed.mkdir()
    (mixed / "config.json").write_text(json.dumps({**json.loads((tmp_path / "cost" / "model" / "config.json").read_text()),
                                                   "template": other}))
    with pytest.raises(ValueError, match=f"{mixed} was trained with --template {other}"):
        ppo_lag.main(["--actor", str(policy), scorers[0], scorers[1], "--cost-model", str(mixed),
                      "--prompts", f"{task.ppo_prompts}:8", "--out", str(tmp_path / "refused_ppo"), *small])
