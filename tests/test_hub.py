"""Models and data sets by Hub id, from a Hugging Face cache in its real on-disk layout (tests/hub_cache.py),
read with HF_HUB_OFFLINE=1 as on a GPU node: nothing reaches the network.

The model is a tiny LLaMA saved by transformers with the embedded task's tokenizer, at two commits (a tag
v1 on the first, main on the second). The data sets copy the real repos' layouts: PKU-SafeRLHF's card with
its `configs:` (subsets alpaca-7b, alpaca2-7b, alpaca3-8b and the default of all three; train and test
splits) over data/<model>/{train,test}.jsonl, and Alpaca's card without configs over
data/train-00000-of-00001-....parquet. Their rows are the embedded task's, in the same schemas.

The online path (what is downloaded, the Hub's own errors) runs against tests/fake_hub.py, a Hub on localhost
that answers huggingface_hub's HTTP requests as huggingface.co does.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_cache import add_folder, add_repo  # noqa: E402
from test_stages import log_of, run  # noqa: E402

import hf_io  # noqa: E402
from data.hub import HubError, resolve_dataset  # noqa: E402
from data.loaders import DataError, load_preferences, load_sft  # noqa: E402

MODEL = "safe-rlhf-test/tiny-llama"
PKU = "PKU-Alignment/PKU-SafeRLHF"
ALPACA = "tatsu-lab/alpaca"
# The configs section of PKU-SafeRLHF's dataset card (README.md front matter), as the repo has it.
PKU_CARD = """---
configs:
- config_name: default
  data_files:
    - split: train
      path:
        - "data/Alpaca-7B/train.jsonl"
        - "data/Alpaca2-7B/train.jsonl"
        - "data/Alpaca3-8B/train.jsonl"
    - split: test
      path:
        - "data/Alpaca-7B/test.jsonl"
        - "data/Alpaca2-7B/test.jsonl"
        - "data/Alpaca3-8B/test.jsonl"
- config_name: alpaca-7b
  data_files:
    - split: train
      path:
        - "data/Alpaca-7B/train.jsonl"
    - split: test
      path:
        - "data/Alpaca-7B/test.jsonl"
- config_name: alpaca2-7b
  data_files:
    - split: train
      path:
        - "data/Alpaca2-7B/train.jsonl"
    - split: test
      path:
        - "data/Alpaca2-7B/test.jsonl"
- config_name: alpaca3-8b
  data_files:
    - split: train
      path:
        - "data/Alpaca3-8B/train.jsonl"
    - split: test
      path:
        - "data/Alpaca3-8B/test.jsonl"
license: cc-by-nc-4.0
---

# Dataset Card for PKU-SafeRLHF
"""
ALPACA_PARQUET = "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"


def tiny_llama(folder: Path, tokenizer: Path, seed: int) -> Path:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory, synthetic_data):
    """The cache and the two commits of the model: (cache dir, commit of v1, commit of main)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    task = synthetic_data
    assert json.loads((task.dir / "manifest.json").read_text())  # the task, as generated
    first = add_folder(cache, MODEL, tiny_llama(root / "v1", task.tokenizer, seed=0), refs=("v1",))
    main = add_folder(cache, MODEL, tiny_llama(root / "v2", task.tokenizer, seed=1), refs=("main",))
    train, test = task.preference_train.read_text().splitlines(), task.preference_eval.read_text().splitlines()
    files = {"README.md": PKU_CARD}
    for k, model in enumerate(("Alpaca-7B", "Alpaca2-7B", "Alpaca3-8B")):  # a third of the rows each
        files[f"data/{model}/train.jsonl"] = "\n".join(train[k::3][:40]) + "\n"
        files[f"data/{model}/test.jsonl"] = "\n".join(test[k::3][:12]) + "\n"
    add_repo(cache, PKU, files, kind="dataset")
    rows = [json.loads(line) for line in task.sft_train.read_text().splitlines()[:64]]
    table = pyarrow.table({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    pq.write_table(table, root / "alpaca.parquet")
    add_repo(cache, ALPACA, {"README.md": "---\nlicense: cc-by-nc-4.0\n---\n# Alpaca\n",
                             ALPACA_PARQUET: root / "alpaca.parquet"}, kind="dataset")
    return cache, first, main


def read_offline(monkeypatch, cache):
    """This process reads `cache`, offline (huggingface_hub reads its constants when called)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def offline(hub, monkeypatch):
    """This process reads the test cache, offline."""
    read_offline(monkeypatch, hub[0])
    return hub


def env_of(cache):
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_model_ids_revisions_and_a_local_folder_of_the_same_name(offline, tmp_path, monkeypatch):
    cache, first, main = offline
    snapshots = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots"
    assert hf_io.resolve_model(MODEL) == str(snapshots / main)
    assert hf_io.resolve_model(f"{MODEL}@v1") == str(snapshots / first)  # a tag
    assert hf_io.resolve_model(f"{MODEL}@{first}") == str(snapshots / first)  # a commit
    a, b = (hf_io.load_pretrained(hf_io.resolve_model(spec)) for spec in (f"{MODEL}@v1", MODEL))
    assert not torch.equal(a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight)
    assert hf_io.resolve_model("tiny") == "tiny"  # a preset stays one
    monkeypatch.chdir(tmp_path)
    (tmp_path / MODEL).mkdir(parents=True)  # a local folder of that name wins, as in transformers
    assert hf_io.resolve_model(MODEL) == MODEL


def test_a_failure_on_the_way_to_the_hub_reads_the_cache_but_a_full_disk_is_said(hub, monkeypatch):
    """Online, a commit (every call after a model's first): a request that fails (huggingface_hub 1.33 raises
    for a commit's listing rather than reading the cache, which .ci/run's second environment checks with the
    real client) falls back to the snapshot in the cache; a failure of this machine's disk is not taken for
    the Hub's and is raised as it is; the Hub's answer about the repo is said as such."""
    import errno

    import httpx  # huggingface_hub's HTTP library since 1.0

    from data import hub as hub_module

    cache, first, _ = hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download
    answer = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x/revision/v9"))
    failures = iter([ConnectionError("the Hub is unreachable"), TimeoutError("the Hub did not answer"),
                     OSError(errno.ENOSPC, "No space left on device"),
                     huggingface_hub.errors.RevisionNotFoundError("no such revision", response=answer)])

    def failing_online(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            raise next(failures)
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_online)
    folder = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / first
    for _ in range(2):
        assert hub_module.snapshot(MODEL, None, "model", ["config.json"], commit=first) == folder
    with pytest.raises(OSError, match="No space left"):
        hub_module.snapshot(MODEL, None, "model", ["config.json"], commit=first)
    with pytest.raises(HubError, match=f"model {MODEL} at revision v9: no such revision"):
        hub_module.snapshot(MODEL, "v9", "model", ["config.json"])


def test_model_id_errors_say_which_id_and_what_to_do(offline):
    import os
    import re
    import shutil
    import subprocess

    with pytest.raises(HubError, match=r"no local folder safe-rlhf-test/absent, and as a Hub id: model "
                                       r"safe-rlhf-test/absent is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*"
                                       r"download safe-rlhf-test/absent") as error:
        hf_io.resolve_model("safe-rlhf-test/absent")
    # the command it names is one the installed huggingface_hub has (its CLI was renamed `hf` in 0.34)
    command = re.search(r"`([^`]*)`", str(error.value))[1].split()
    assert command[1:] == ["download", "safe-rlhf-test/absent"]
    cli = shutil.which(command[0], path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert cli and subprocess.run([cli, "download", "--help"], capture_output=True).returncode == 0, command[0]
    with pytest.raises(HubError, match=rf"{MODEL} at revision v9 is not in the Hugging Face cache.*--revision v9"):
        hf_io.resolve_model(f"{MODEL}@v9")


def test_dataset_subsets_and_splits_as_the_card_declares_them(offline):
    folder = offline[0] / f"datasets--{PKU.replace('/', '--')}"
    one = resolve_dataset(f"{PKU}:alpaca-7b:train").files
    assert [f.relative_to(next((folder / "snapshots").iterdir())).as_posix() for f in one] == ["data/Alpaca-7B/train.jsonl"]
    assert len(resolve_dataset(PKU).files) == 3  # the default subset, train
    assert [f.parent.name for f in resolve_dataset(f"{PKU}:test").files] == ["Alpaca-7B", "Alpaca2-7B", "Alpaca3-8B"]
    assert resolve_dataset(f"{PKU}:alpaca2-7b").files[0].parent.name == "Alpaca2-7B"  # a subset, train split
    assert resolve_dataset(f"{PKU}:alpaca3-8b:test").files[0].name == "test.jsonl"
    assert [f.name for f in resolve_dataset(ALPACA).files] == [Path(ALPACA_PARQUET).name]  # no configs: file names
    with pytest.raises(HubError, match="no subset 'alpaca-9b'.*its subsets: default, alpaca-7b, alpaca2-7b, alpaca3-8b"):
        resolve_dataset(f"{PKU}:alpaca-9b:train")
    with pytest.raises(HubError, match=r"no split 'validation' in PKU-Alignment/PKU-SafeRLHF \(alpaca-7b\); its splits: train, test"):
        resolve_dataset(f"{PKU}:alpaca-7b:validation")
    with pytest.raises(HubError, match="no split 'test'.*its splits: train"):
        resolve_dataset(f"{ALPACA}:test")


def test_dataset_rows_through_the_loaders(offline, synthetic_data):
    rows, stats = load_preferences(f"{PKU}:alpaca-7b:train:5", log=None)
    assert len(rows) == 5 and stats.rows == 40
    all_three, _ = load_preferences(f"{PKU}:train", log=None)
    assert len(all_three) == 120  # one split over three files
    sft, _ = load_sft(f"{ALPACA}:16", log=None)
    local, _ = load_sft(str(synthetic_data.sft_train), log=None)
    assert len(sft) == 16 and set(sft) <= set(local[:64])
    with pytest.raises(DataError, match=r"no data file PKU-Alignment/PKU-SafeRLHF:alpaca-9b, and as a Hub dataset: .*"
                                        r"no split 'alpaca-9b'"):
        load_preferences(f"{PKU}:alpaca-9b", log=None)  # one name: neither a subset nor a split
    with pytest.raises(FileNotFoundError, match="data file not found: org/absent.jsonl"):  # a path stays a path
        load_preferences("org/absent.jsonl", log=None)


@pytest.mark.slow
def test_ids_through_every_stage_offline(hub, tmp_path, synthetic_data):
    cache, _, main = hub
    env = env_of(cache)
    task = synthetic_data
    small = ["--recipe", "tiny", "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "96",
             "--synthetic-dir", str(task.dir)]
    out = run("sft.py", ["--model", MODEL, "--data", f"{ALPACA}:16", "--eval-data", f"{ALPACA}:4", "--max-steps", "1",
                         "--out", str(tmp_path / "sft"), *small], env_extra=env)
    assert f"--model {MODEL}: {cache}" in out.stdout and "recipe tiny" in out.stdout
    for objective in ("reward", "cost"):
        run("train_score.py", ["--objective", objective, "--model", str(tmp_path / "sft" / "model"),
                               "--data", f"{PKU}:alpaca-7b:train:16", "--eval-data", f"{PKU}:alpaca-7b:test:8",
                               "--max-steps", "1", "--out", str(tmp_path / objective), *small], env_extra=env)
    run("ppo_lag.py", ["--actor", str(tmp_path / "sft" / "model"), "--reward-model", str(tmp_path / "reward" / "model"),
                       "--cost-model", str(tmp_path / "cost" / "model"), "--reference", f"{MODEL}@{main}",
                       "--prompts", f"{PKU}:alpaca-7b:train:8", "--ptx-data", f"{ALPACA}:8", "--max-new-tokens", "6",
                       "--max-steps", "2", "--out", str(tmp_path / "ppo"), *small], env_extra=env)
    assert len(log_of(tmp_path / "ppo")) == 2
    scorers = ["--reward-model", str(tmp_path / "reward" / "model"), "--cost-model", str(tmp_path / "cost" / "model")]
    judged = run("evaluate.py", ["--models", MODEL, str(tmp_path / "ppo" / "actor"), *scorers, "--prompts",
                                 f"{task.eval_prompts}:8", "--samples-per-prompt", "1", "--max-new-tokens", "6",
                                 "--out", str(tmp_path / "eval"), "--synthetic-dir", str(task.dir)], env_extra=env)
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert len(results) == 2 and str(cache) in next(iter(results)) and "harmful" in judged.stdout
    run("evaluate.py", ["--arena", MODEL, str(tmp_path / "ppo" / "actor"), *scorers, "--prompts", f"{PKU}:test:4",
                        "--samples-per-prompt", "1", "--max-new-tokens", "6", "--out", str(tmp_path / "arena")],
        env_extra=env)
    assert json.loads((tmp_path / "arena" / "arena.json").read_text())["n"] == 4


class RecordingDist:
    """One rank of a node, as node_leader_first sees it: what it runs, and where it waits."""

    def __init__(self, local_rank):
        self.local_rank, self.events = local_rank, []

    def barrier(self):
        self.events.append("barrier")


@pytest.mark.parametrize("others", [True, False])
def test_the_node_leader_fills_the_cache_before_the_others_read_it(others):
    from training import node_leader_first

    leader, other = RecordingDist(0), RecordingDist(1)
    for d in (leader, other):
        assert node_leader_first(d, lambda d=d: d.events.append("fn") or d.local_rank, others=others) == (
            d.local_rank if d is leader or others else None)
    assert leader.events == ["fn", "barrier"] + ["barrier"] * others
    assert other.events == ["barrier"] + ["fn", "barrier"] * others  # waits for the leader's fn first


def test_data_sets_are_fetched_by_the_node_leader_only(offline, tmp_path):
    from training import fetch_datasets

    local = tmp_path / "rows.jsonl"
    local.write_text("")
    fetch_datasets(RecordingDist(0), f"{PKU}:alpaca-7b:train:8", None, str(local))  # in the cache: found
    with pytest.raises(DataError, match="safe-rlhf-test/absent-data"):  # the leader looks it up, and says so
        fetch_datasets(RecordingDist(0), str(local), "safe-rlhf-test/absent-data")
    fetch_datasets(RecordingDist(1), "safe-rlhf-test/absent-data")  # the others only wait; their load says it


@pytest.mark.slow
def test_two_ranks_resolve_an_id_once_per_node(hub, tmp_path):
    cache, _, main = hub
    out = run("sft.py", ["--model", MODEL, "--data", f"{ALPACA}:16", "--max-steps", "1", "--batch-size", "4",
                         "--micro-batch-size", "2", "--max-length", "96", "--out", str(tmp_path / "sft")],
              nproc=2, env_extra=env_of(cache))
    snapshot = cache / f"models--{MODEL.replace('/', '--')}" / "snapshots" / main
    assert out.stdout.count(f"--model {MODEL}: {snapshot}") == 1
    assert (tmp_path / "sft" / "model" / "config.json").is_file()


def run_error(script, args, env_extra):
    """A script run that must stop at a user error: exit 2, one message, no traceback. Returns the message."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERNELS": "torch", **env_extra}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / script), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_hub_errors_are_one_line_naming_the_id(hub, tmp_path):
    env = env_of(hub[0])
    message = run_error("sft.py", ["--model", "safe-rlhf-test/absent", "--out", str(tmp_path / "a")], env_extra=env)
    assert "safe-rlhf-test/absent is not in the Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    message = run_error("train_score.py", ["--objective", "reward", "--model", MODEL, "--data", f"{PKU}:alpaca-9b:train",
                                           "--out", str(tmp_path / "b")], env_extra=env)
    assert "no subset 'alpaca-9b'" in message and "alpaca-7b" in message


def test_dataset_revisions_and_the_cards_default_subset(tmp_path, monkeypatch):
    """A data set id's @revision reads that commit's files, not main's; a card's config marked `default: true`
    is the subset an id without one reads (as `datasets` does), whatever its name."""
    cache = tmp_path / "cache"
    read_offline(monkeypatch, cache)
    rows = lambda *prompts: "".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p in prompts)  # noqa: E731
    repo = "safe-rlhf-test/revised"
    first = add_repo(cache, repo, {"README.md": "---\nlicense: mit\n---\n", "train.jsonl": rows("a", "b")},
                     kind="dataset", refs=("v1",))
    add_repo(cache, repo, {"README.md": "---\nlicense: mit\n---\n", "train.jsonl": rows("a", "b", "c")},
             kind="dataset", refs=("main",))
    assert [e.prompt for e in load_sft(f"{repo}@v1", log=None)[0]] == ["a", "b"]
    assert [e.prompt for e in load_sft(f"{repo}@{first}:train", log=None)[0]] == ["a", "b"]
    assert [e.prompt for e in load_sft(repo, log=None)[0]] == ["a", "b", "c"]
    # without configs, a split's name must stand apart in a file's path (testimonials.jsonl is no test split)
    add_repo(cache, "safe-rlhf-test/named", {"train.jsonl": rows("t"), "data/test-00000.jsonl": rows("x"),
                                             "testimonials.jsonl": rows("no"), "devices.jsonl": rows("no")},
             kind="dataset")
    assert [f.name for f in resolve_dataset("safe-rlhf-test/named:test").files] == ["test-00000.jsonl"]
    with pytest.raises(HubError, match=r"no split 'validation'.*its splits: train, test$"):
        resolve_dataset("safe-rlhf-test/named:validation")

    card = """---
configs:
- config_name: small
  data_files:
    - split: train
      path: small/train.jsonl
- config_name: large
  default: true
  data_files:
    - split: train
      path: large/train.jsonl
---
"""
    add_repo(cache, "safe-rlhf-test/two-subsets", {"README.md": card, "small/train.jsonl": rows("s"),
                                                   "large/train.jsonl": rows("l1", "l2")}, kind="dataset")
    assert [f.parent.name for f in resolve_dataset("safe-rlhf-test/two-subsets").files] == ["large"]
    assert [f.parent.name for f in resolve_dataset("safe-rlhf-test/two-subsets:small").files] == ["small"]


# Repos without `configs:`, split as the `datasets` library splits them: its rules written out by hand
# here, from the Hub's "File names and splits" page (the first rule that finds a file decides).
LAYOUTS = [
    # a file named after a split, the name standing apart: start, end, or - . _ space digit around it
    ({"my_train_file.jsonl": "a", "train1.jsonl": "b", "dev.jsonl": "c", "my test.jsonl": "d", "eval.json": "e",
      "interval.jsonl": "-", "retrain.jsonl": "-"},
     {"train": ["my_train_file.jsonl", "train1.jsonl"], "validation": ["dev.jsonl"],
      "test": ["eval.json", "my test.jsonl"]}),
    # no split named anywhere: every data file is train
    ({"data.jsonl": "a", "more/rows.parquet": "b"}, {"train": ["data.jsonl", "more/rows.parquet"]}),
    # a directory named after a split wins over file names, and files outside such a directory are not read
    ({"training/part-0.jsonl": "a", "data/valid-set/x.jsonl": "b", "test.jsonl": "-"},
     {"train": ["training/part-0.jsonl"], "validation": ["data/valid-set/x.jsonl"]}),
    # push_to_hub's shards name any split, and the usual three come first; nothing else is read
    ({"data/harmless-00000-of-00002.jsonl": "a", "data/harmless-00001-of-00002.jsonl": "b",
      "data/test-00000-of-00001.jsonl": "c", "train.jsonl": "-"},
     {"test": ["data/test-00000-of-00001.jsonl"],
      "harmless": ["data/harmless-00000-of-00002.jsonl", "data/harmless-00001-of-00002.jsonl"]}),
    # hidden folders are not data
    ({".cache/train.jsonl": "-", "x/test.jsonl": "a"}, {"test": ["x/test.jsonl"]}),
]


@pytest.mark.parametrize("files, splits", LAYOUTS, ids=["file_names", "no_split_names", "directories", "shards",
                                                        "hidden"])
def test_dataset_splits_follow_the_datasets_library(files, splits, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    read_offline(monkeypatch, cache)
    repo = "safe-rlhf-test/layout"
    add_repo(cache, repo, {name: json.dumps({"prompt": tag, "response": "ok"}) + "\n" for name, tag in files.items()},
             kind="dataset")
    for split, names in splits.items():
        files_read = resolve_dataset(f"{repo}:{split}").files  # .../snapshots/<commit>/<path in the repo>
        assert sorted("/".join(f.parts[f.parts.index("snapshots") + 2:]) for f in files_read) == names
    with pytest.raises(HubError, match=f"no split 'nope' in {repo}; its splits: {', '.join(splits)}$"):
        resolve_dataset(f"{repo}:nope")


# The online path, against a Hub on localhost that speaks its HTTP API (tests/fake_hub.py): huggingface_hub
# resolves, lists and downloads from it as from huggingface.co, in a process started with HF_ENDPOINT.
RESOLVE_ONLINE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import hf_io
from data.hub import HubError, resolve_dataset
for spec in sys.argv[2:]:
    try:
        kind, name = spec.split(" ")
        got = hf_io.resolve_model(name) if kind == "model" else [str(f) for f in resolve_dataset(name).files]
        print(json.dumps({"spec": name, "got": got}))
    except HubError as error:
        print(json.dumps({"spec": name, "error": str(error)}))
"""


def resolve_online(endpoint, cache, *specs):
    """{spec: what it resolved to, or its HubError's message}, in a process that reaches the Hub at `endpoint`."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="hf_test")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", RESOLVE_ONLINE, str(root), *specs], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {line["spec"]: line.get("got", line.get("error")) for line in map(json.loads, proc.stdout.splitlines())}


def test_online_only_the_files_read_are_downloaded(tmp_path, monkeypatch):
    """A model id downloads config, tokenizer and the weights transformers reads: its index's shards, not the
    other weights releases ship beside them (Mistral-7B-Instruct-v0.3's consolidated.safetensors, Llama's
    original/), and a lone model.safetensors, not the shards of a stale index beside it. A data set without
    `configs:` downloads the split asked for, not the others. Then the same ids resolve offline, from the
    cache as the downloads left it; and the Hub's errors (no such repo, gated, no such revision) are said."""
    from fake_hub import FakeHub

    source = tmp_path / "source"
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(source / "sharded", max_shard_size="40KB")
    transformers.LlamaForCausalLM(config).save_pretrained(source / "single")
    sharded = {f.name: f.read_bytes() for f in (source / "sharded").iterdir()}
    shards = sorted(n for n in sharded if n.startswith("model-0"))
    assert len(shards) > 1 and "model.safetensors.index.json" in sharded
    sharded |= {"tokenizer.json": "{}", "README.md": "# a release\n", "consolidated.safetensors": b"\0" * 4096,
                "params.json": "{}", "original/consolidated.00.pth": b"\0" * 4096}
    single = {f.name: f.read_bytes() for f in (source / "single").iterdir()}  # model.safetensors, config.json
    single |= {"model.safetensors.index.json": sharded["model.safetensors.index.json"]} | {s: sharded[s] for s in shards}
    rows = lambda *prompts: "".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p in prompts)  # noqa: E731
    data = {"README.md": "---\nlicense: mit\n---\n", "train.jsonl": rows(*"abcdefgh"), "test.jsonl": rows("t"),
            "data/dev.jsonl": rows("d")}
    repos = {("model", "org/mistral-like"): sharded, ("model", "org/single"): single, ("dataset", "org/data"): data,
             ("model", "org/gated"): single}
    cache = tmp_path / "cache"

    with FakeHub(repos, gated={"org/gated"}) as hub:
        got = resolve_online(hub.endpoint, cache, "model org/mistral-like", "dataset org/data:test")
        assert sorted(hub.downloads) == sorted(["config.json", "generation_config.json", "tokenizer.json",
                                                "model.safetensors.index.json", *shards, "README.md", "test.jsonl"])
        hub.downloads.clear()
        got |= resolve_online(hub.endpoint, cache, "model org/single", "model org/gated", "model org/absent",
                              "dataset org/data@v2:test", "dataset org/data:validation")
        assert sorted(hub.downloads) == ["config.json", "data/dev.jsonl", "generation_config.json", "model.safetensors",
                                         "model.safetensors.index.json"]
        commit = hub.commits[("model", "org/mistral-like")]

    folder = Path(got["org/mistral-like"])
    assert folder == cache / "models--org--mistral-like" / "snapshots" / commit
    assert {p: (folder / p).read_bytes() for p in [*shards, "config.json"]} == {p: sharded[p] for p in [*shards, "config.json"]}
    assert [Path(f).name for f in got["org/data:test"]] == ["test.jsonl"]
    assert [Path(f).name for f in got["org/data:validation"]] == ["dev.jsonl"]
    assert "model org/gated is gated: accept its terms on https://huggingface.co/org/gated" in got["org/gated"]
    assert "model org/absent: no such model on the Hub" in got["org/absent"]
    assert "dataset org/data at revision v2: no such revision" in got["org/data@v2:test"]

    read_offline(monkeypatch, cache)  # the Hub is gone: what was downloaded is enough
    assert hf_io.resolve_model("org/mistral-like") == str(folder)
    model = hf_io.load_pretrained(folder)  # every shard of the index is there
    reference = transformers.LlamaForCausalLM.from_pretrained(source / "sharded")
    assert torch.equal(model.tok_embeddings.weight, reference.model.embed_tokens.weight)
    assert [f.read_text() for f in resolve_dataset("org/data:test").files] == [rows("t")]
    # never downloaded (huggingface_hub >= 2 keeps the repo's listing: the split is known, its file is not there)
    # (named as asked: no revision, not the commit the card resolved to)
    with pytest.raises(HubError, match="(dataset org/data is not in the Hugging Face cache|no split 'train')"):
        resolve_dataset("org/data:train")


def test_online_a_hub_that_fails_falls_back_to_the_cache(tmp_path):
    """The network up but the Hub failing (503: down; 401: a token revoked) after a data set was downloaded:
    it still resolves from the cache, as huggingface_hub's snapshot_download does, the listing that decides
    the splits included: the one cached beside the snapshot (huggingface_hub >= 2), else the cached files."""
    import shutil

    from fake_hub import FakeHub

    rows = "".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p in "ab")
    data = {"README.md": "---\nlicense: mit\n---\n", "train.jsonl": rows, "test.jsonl": rows}
    cache = tmp_path / "cache"
    with FakeHub({("dataset", "org/data"): data}) as hub:
        first = resolve_online(hub.endpoint, cache, "dataset org/data:test")
        assert [Path(f).name for f in first["org/data:test"]] == ["test.jsonl"]
        hub.down = 503
        assert resolve_online(hub.endpoint, cache, "dataset org/data:test") == first
        shutil.rmtree(cache / "datasets--org--data" / "trees", ignore_errors=True)  # as huggingface_hub < 2 leaves it
        hub.down = 401  # not retried by huggingface_hub, unlike 5xx and 429
        assert resolve_online(hub.endpoint, cache, "dataset org/data:test") == first
