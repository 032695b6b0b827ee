"""Models on disk: the Hugging Face format (config.json + safetensors), and atomic writes.

    model = load_pretrained(path, dtype, ...)  one plain Transformer from a Hugging Face directory
    path = resolve_model("org/name@revision")   a Hub id -> its folder in the Hugging Face cache
    src = describe(path_or_preset, head)       config only: ModelArgs, which head, score statistics
    state = full_state_dict(src, seed)         every tensor, keyed by OUR names, ready for load_state_dict
    save_pretrained(model, path)               config.json + safetensors (sharded above 5 GiB), atomic
                                               (fileio.atomic_directory)

This is the one loading path from a Hugging Face directory or a preset: `load_pretrained` and
`training.load_model` go through `full_state_dict` (training checkpoints are sharded, and
checkpoint.py reads their shards straight into the model), which handles once what differs
between checkpoints: a preset (fresh weights), an LM checkpoint loaded as a score
model (a fresh, seeded score head; the LM head dropped), and tied embeddings (`output.weight`
is `tok_embeddings.weight`, present in the returned dict so a strict load sees every key).

Hugging Face names exist only here (`HF_NAMES`), at load and save time; model.py uses Meta's and knows
nothing of disk: this module calls into it, never the reverse.
Only safetensors are read: a pickled `.bin` could run code when loaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fileio import atomic_directory
from model import PRESETS, ModelArgs, Transformer

# ----------------------------------------------------------------------------------------------
# Names and config

# (ours, Hugging Face's): substring replacements, applied in order.
HF_NAMES = [
    ("tok_embeddings", "embed_tokens"),
    ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attention.wq", "self_attn.q_proj"),
    ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"),
    ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("output", "lm_head"),
]


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face LLaMA name."""
    for ours, theirs in HF_NAMES:
        name = name.replace(ours, theirs)
    if not name.startswith(("lm_head", "score_head")):
        name = "model." + name
    return name


# model_type -> the Hugging Face class-name prefix. All three share LLaMA's layout; Qwen2 adds
# biases on the query/key/value projections, Mistral (v0.1) a sliding attention window.
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def hf_config(args: ModelArgs, head: str, dtype: torch.dtype) -> dict:
    rope = {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": args.rope_theta}
    prefix = FAMILIES[args.family]
    config = {
        "architectures": [f"{prefix}ForCausalLM" if head == "lm" else f"{prefix}ForScore"],
        "model_type": args.family,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        # Both spellings: transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "rope_parameters": rope,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if args.family == "mistral":
        config["sliding_window"] = args.sliding_window
    if args.family == "qwen2":  # its q/k/v biases are implied by the architecture
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    if head == "score":
        config["score_dim"] = 1
        config["score_bias"] = True
    return config


def read_config(path) -> tuple[ModelArgs, str, dict]:
    """ModelArgs, head ("lm" or "score") and the raw dict of <path>/config.json, with errors that
    name the file and the key."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not file.is_file():
        products = [str(Path(path) / name) for name in ("model", "actor") if (Path(path) / name / "config.json").is_file()]
        hint = f" (a stage's --out folder? its product is {' or '.join(products)})" if products else ""
        raise FileNotFoundError(f"{file} is missing: not a Hugging Face-format checkpoint{hint}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object")

    def need(key):
        if config.get(key) is None:
            raise KeyError(f"{file} has no {key!r}")
        return config[key]

    def positive(key, kind=int, default=None, required=False):
        """config[key], a positive integer (kind int) or number (float: an int does too), or `default`
        where absent or null: a string or a 0 here would fail deep in the model, far from this file."""
        value = need(key) if required else config.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)) or not value > 0:
            raise ValueError(f"{file}: {key!r} must be a positive {'integer' if kind is int else 'number'}, got "
                             f"{json.dumps(value)}; fix it in config.json")
        return value

    def typed(key, kinds, what, default=None):
        value = config.get(key)
        if value is None:
            return default
        if not isinstance(value, kinds):
            raise ValueError(f"{file}: {key!r} must be {what}, got {json.dumps(value)[:60]}; fix it in config.json")
        return value

    architectures = typed("architectures", list, "a list of class names", [])
    if not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"{file}: 'architectures' must be a list of class names, got {json.dumps(architectures)[:60]}")
    family = typed("model_type", str, "a string") or ("llama" if any(a.startswith("Llama") for a in architectures)
                                                      else None)
    if family not in FAMILIES:
        raise ValueError(f"{file}: model_type {family!r} (architectures {architectures}) is not supported; supported: "
                         "LLaMA / Llama-2 / Llama-3 (llama), Mistral (mistral), Qwen2 / Qwen2.5 (qwen2)")
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias") or (
            family != "qwen2" and config.get("attention_bias")):
        raise ValueError(f"{file}: only LLaMA's silu MLP without biases (and Qwen2's q/k/v biases) is supported")
    sliding_window = positive("sliding_window") if family == "mistral" else None
    if family == "qwen2" and config.get("use_sliding_window"):
        raise ValueError(f"{file}: Qwen2's sliding-window layers (use_sliding_window: true) are not supported")

    rope = typed("rope_parameters", dict, "an object", {})
    rope_theta = positive("rope_theta", float) or rope.get("rope_theta", 10000.0)
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
        raise ValueError(f"{file}: rope_parameters' 'rope_theta' must be a positive number, got {json.dumps(rope_theta)}")
    scaling = typed("rope_scaling", dict, "an object or null")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    _check_rope_scaling(file, scaling)

    dim, n_heads = positive("hidden_size", required=True), positive("num_attention_heads", required=True)
    n_kv_heads, head_dim = positive("num_key_value_heads"), positive("head_dim")
    if head_dim is None and dim % n_heads:
        raise ValueError(f"{file}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads} (and there "
                         "is no head_dim)")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"{file}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
    if (head_dim or dim // n_heads) % 2:
        raise ValueError(f"{file}: the head dimension {head_dim or dim // n_heads} is odd; RoPE rotates pairs of "
                         "channels, so it must be even")
    fields = dict(
        dim=dim,
        n_layers=positive("num_hidden_layers", required=True),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=positive("vocab_size", required=True),
        hidden_dim=positive("intermediate_size", required=True),
        head_dim=head_dim,
        norm_eps=positive("rms_norm_eps", float, 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_seq_len=positive("max_position_embeddings", default=2048),
        tie_embeddings=typed("tie_word_embeddings", bool, "true or false", False),
        qkv_bias=family == "qwen2",
        sliding_window=sliding_window,
        family=family,
    )
    typed("score_stats", dict, "an object (train_score.py's statistics)")
    try:
        args = ModelArgs(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None
    head = "score" if any(a.endswith("ForScore") for a in architectures) or config.get("score_dim") else "lm"
    return args, head, config


def _check_rope_scaling(file: Path, scaling: dict | None):
    """A rope_scaling model.rope_inv_freq can apply: none, "default", or Llama-3.1's "llama3" with its four
    positive numbers (named here rather than as a KeyError or an unsupported type at the first forward)."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{file}: rope_scaling type {kind!r} is not supported (supported: llama3, or none)")
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            value = scaling.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{file}: rope_scaling {key!r} must be a positive number, got {json.dumps(value)}")
        if scaling["high_freq_factor"] == scaling["low_freq_factor"]:
            raise ValueError(f"{file}: rope_scaling's high_freq_factor and low_freq_factor must differ")


# ----------------------------------------------------------------------------------------------
# The one loading path: (path or preset, head) -> a full state dict


@dataclass
class ModelSource:
    """What a checkpoint directory or a preset name says about a model, before any tensor is read."""
    spec: str  # the directory or preset name, as given
    args: ModelArgs
    head: str  # the head wanted: "lm" or "score"
    saved_head: str | None  # the head in the files; None for a preset (fresh weights)
    config: dict  # the raw config.json ({} for a preset)

    @property
    def path(self) -> Path | None:
        return None if self.saved_head is None else Path(self.spec)

    @property
    def fresh_score_head(self) -> bool:
        """An LM checkpoint started as a score model: its head is new."""
        return self.head == "score" and self.saved_head == "lm"

    @property
    def score_stats(self) -> dict | None:
        return self.config.get("score_stats") if self.saved_head == "score" else None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint was saved in (fp32 for a preset or a config without one)."""
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32


# What a model repo holds that we read: the config, the tokenizer and generation files that travel with
# it, and weights as safetensors only (a pickled .bin is never read): model.safetensors or, without one, the
# shards its index lists (as transformers reads them), fetched once the index is in. Never "*.safetensors":
# releases ship other weights beside them (Mistral-7B-Instruct-v0.3's consolidated.safetensors: 14.5 GB more).
MODEL_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"]


def resolve_model(spec: str) -> str:
    """A local folder or a preset, as given; a Hub id "org/name[@revision]" -> its snapshot folder in the
    Hugging Face cache (data/hub.py: downloaded if missing and allowed, only MODEL_FILES and the index's
    shards). A local folder of the same name wins, as in transformers."""
    from data.hub import HubError, hf_cli, is_hub_id, snapshot, split_id

    spec = str(spec)
    if spec in PRESETS or not is_hub_id(spec):
        return spec
    repo_id, revision = split_id(spec)
    try:
        folder = snapshot(repo_id, revision, "model", MODEL_FILES)
        index = folder / "model.safetensors.index.json"
        if index.is_file() and not (folder / "model.safetensors").is_file():
            folder = snapshot(repo_id, revision, "model", _index_shards(index), commit=folder.name)  # that commit's
    except HubError as error:  # perhaps a mistyped local path: say both
        raise HubError(f"no local folder {spec}, and as a Hub id: {error}") from None
    if not (folder / "config.json").is_file():
        raise HubError(f"{spec}: its cached snapshot {folder} has no config.json (not a model, or partly "
                       f"downloaded): run `{hf_cli('download')} {repo_id}` where there is network")
    return str(folder)


def describe(spec, head: str | None = None, vocab_size: int | None = None) -> ModelSource:
    """A checkpoint directory or a model.PRESETS name (vocab_size overrides a preset's). head None
    keeps the checkpoint's own; a score checkpoint never loads as an LM."""
    spec = str(spec)
    if Path(spec).is_dir():
        args, saved_head, config = read_config(spec)
        head = head or saved_head
        if saved_head == "score" and head == "lm":
            raise ValueError(f"{spec} holds a score model (a reward or cost model: architectures "
                             f"{config.get('architectures')}), not a language model; a policy is sft.py's <out>/model "
                             "or ppo_lag.py's <out>/actor")
        return ModelSource(spec, args, head, saved_head, config)
    if spec not in PRESETS:
        raise FileNotFoundError(f"{spec}: no such checkpoint directory (the path does not exist), nor a model "
                                f"preset ({', '.join(PRESETS)})")
    args = ModelArgs.from_name(spec, **({"vocab_size": vocab_size} if vocab_size else {}))
    return ModelSource(spec, args, head or "lm", None, {})


def full_state_dict(src: ModelSource, seed: int = 0, path=None) -> dict[str, torch.Tensor]:
    """Every tensor of the model `src` describes, keyed by our names: read from `path` (default:
    src's directory), or fresh from `init_weights(seed)` for a preset. A fresh score head is
    seeded too (the same on every rank and in every run); with tied embeddings `output.weight`
    is the embedding tensor itself."""
    path = path or src.path
    if path is None:
        with torch.device("cpu"):
            fresh = Transformer(src.args, head=src.head)
        fresh.init_weights(seed=seed)
        return fresh.state_dict()
    state = _read_safetensors(Path(path), src.args, src.head, src.saved_head)
    if src.fresh_score_head:
        generator = torch.Generator().manual_seed(seed)
        state["score_head.weight"] = torch.randn(1, src.args.dim, generator=generator) * 0.02
        state["score_head.bias"] = torch.zeros(1)
    if src.args.tie_embeddings and src.head == "lm":
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def expected_tensors(args: ModelArgs, head: str) -> dict[str, tuple[str, tuple]]:
    """Hugging Face name -> (our name, shape) for every tensor a checkpoint of this model holds."""
    with torch.device("meta"):
        model = Transformer(args, head=head)
    tensors = {hf_name(k): (k, tuple(v.shape)) for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def _read_safetensors(path: Path, args: ModelArgs, head: str, saved_head: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, keyed by our names, each checked against the shape
    config.json implies (errors name the file and the key)."""
    wanted = expected_tensors(args, head)
    if head != saved_head:  # LM checkpoint -> score model: the new head is not in the file
        wanted = {k: v for k, v in wanted.items() if not k.startswith("score_head")}
    state, where = {}, {}
    for file in _safetensors_files(path):
        try:
            reader = safe_open(file, framework="pt")
        except Exception as e:  # truncated or corrupted: safetensors' own message does not name the file
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        with reader as f:
            for key in f.keys():
                if key in wanted:
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:
                        raise ValueError(f"{file}: tensor {key!r} cannot be read ({e})") from None
                    ours, shape = wanted[key]
                    if tuple(tensor.shape) != shape:
                        raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                         f"expected {shape} from config.json")
                    state[ours], where[key] = tensor, file
                elif "rotary_emb" in key or key == "lm_head.weight" and head == "score":
                    continue  # old checkpoints store RoPE tables; a score model drops the LM head
                else:
                    raise ValueError(f"{file}: unexpected tensor {key!r} for a {head} model of this config")
    missing = [k for k in wanted if k not in where]
    if missing:
        listed = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise KeyError(f"checkpoint {path} is missing tensor(s) {listed}")
    return state


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder: model.safetensors when there is one (transformers reads
    it first, even beside an index), else the shards its index lists."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if index.is_file():
        files = [path / name for name in _index_shards(index)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} is listed in {index} but missing")
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pth")):
        raise ValueError(f"{path} holds only pickle weights (.bin/.pth); convert them to safetensors "
                         "(loading pickles could run arbitrary code)")
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def _index_shards(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json lists, each once, in order."""
    try:
        return list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"{index} is malformed: {e}") from None


def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu", head: str | None = None,
                    seed: int = 0) -> Transformer:
    """A Hugging Face-format directory (config.json + model.safetensors, or sharded with
    model.safetensors.index.json) as one plain Transformer. A score-model checkpoint loads as a score
    model; head="score" starts a score model from an LM checkpoint (new score head drawn with `seed`;
    the LM head is dropped). dtype None keeps the checkpoint's dtype field (fp32 if absent)."""
    src = describe(path, head)
    dtype = dtype or src.dtype
    state = full_state_dict(src, seed=seed)
    with torch.device("meta"):
        model = Transformer(src.args, head=src.head)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    if src.args.tie_embeddings and src.head == "lm":  # assign=True replaced the shared Parameter
        model.output.weight = model.tok_embeddings.weight
    model.score_stats = src.score_stats
    return model


# ----------------------------------------------------------------------------------------------
# Saving


def save_pretrained(model: Transformer, path, dtype: torch.dtype | None = None, max_shard_size: int = 5 * 2**30,
                    extra_config: dict | None = None, extra_files=()):
    """Write config.json and safetensors in Hugging Face's LLaMA layout, sharded above
    max_shard_size bytes, atomically, with `extra_files` (e.g. the tokenizer) copied in (a path) or
    written (a (name, text) pair).

    Works on a plain module and on an FSDP2-sharded one: every rank must call it (gathering a
    DTensor is a collective) and only rank 0 writes. Tensors are gathered one at a time and
    streamed to disk as they arrive: each safetensors file's header is written first, from the
    shapes alone, then each tensor's bytes right after its gather. No rank ever holds more than one
    full tensor on the host (at 7B: the 0.5 GB embedding, not the 27 GB model). The files are
    ordinary safetensors (8-byte-aligned header, `format: pt`), loadable by transformers."""
    import contextlib

    main = _rank() == 0
    tensors = [(hf_name(name), tensor) for name, tensor in model.state_dict().items()
               if not (model.args.tie_embeddings and name == "output.weight")]
    dtypes = {key: dtype or tensor.dtype for key, tensor in tensors}
    config = hf_config(model.args, model.head, dtypes[tensors[0][0]])
    if model.head == "score" and model.score_stats is not None:
        config["score_stats"] = model.score_stats
    config.update(extra_config or {})
    files = _plan_safetensors_files(tensors, dtypes, max_shard_size)
    with atomic_directory(path) if main else contextlib.nullcontext() as tmp:
        for name, entries in files.items():
            with _SafetensorsStream(tmp / name, [(k, tuple(t.shape), dtypes[k]) for k, t in entries]) \
                    if main else contextlib.nullcontext() as stream:
                for key, tensor in entries:
                    if hasattr(tensor, "full_tensor"):  # DTensor under FSDP2: every rank gathers, one tensor at a time
                        tensor = tensor.full_tensor()
                    if main:
                        stream.write(key, tensor.detach().to("cpu", dtype=dtypes[key]))
                    del tensor
        if main:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if len(files) > 1:
                weight_map = {key: name for name, entries in files.items() for key, _ in entries}
                total = sum(_nbytes(t.shape, dtypes[k]) for k, t in tensors)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for f in extra_files:
                if isinstance(f, tuple):  # (name, text): a file written here
                    (tmp / f[0]).write_text(f[1])
                else:
                    shutil.copy(f, tmp / Path(f).name)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _plan_safetensors_files(tensors: list, dtypes: dict, max_shard_size: int) -> dict[str, list]:
    """File name -> [(name, tensor)], in order, a new file whenever the next tensor would take the
    current one past max_shard_size bytes: model.safetensors, or model-0000i-of-0000n.safetensors."""
    shards, size = [[]], 0
    for key, tensor in tensors:
        nbytes = _nbytes(tensor.shape, dtypes[key])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


class _SafetensorsStream:
    """One safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets)
    first, from the shapes alone, then each tensor's bytes, in the header's order, as they come.
    The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
    length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes back to back."""

    def __init__(self, file: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        import sys

        if sys.byteorder != "little":
            raise NotImplementedError("safetensors are little-endian; writing them from a big-endian host is not supported")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.expected = []
        for key, shape, dtype in entries:
            nbytes = _nbytes(shape, dtype)
            header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((key, tuple(shape), dtype))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.file, self.done = file, 0
        self.fh = open(file, "wb")
        self.fh.write(len(blob).to_bytes(8, "little") + blob)

    def __enter__(self):
        return self

    def write(self, key: str, tensor: torch.Tensor):
        want = self.expected[self.done]
        if (key, tuple(tensor.shape), tensor.dtype) != want:
            raise ValueError(f"{self.file}: expected tensor {want}, got {(key, tuple(tensor.shape), tensor.dtype)}")
        self.fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.done += 1

    def __exit__(self, exc_type, exc, tb):
        self.fh.close()
        if exc_type is None and self.done != len(self.expected):
            raise ValueError(f"{self.file}: {self.done} of {len(self.expected)} tensors written")
        return False


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
