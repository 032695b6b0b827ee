"""Hugging Face Hub ids, read through huggingface_hub's cache: the one place that talks to the Hub.

    snapshot(repo_id, revision, repo_type, patterns)   the repo's snapshot folder in the HF cache (downloaded
                                                       if missing and allowed), with a one-line error
    is_hub_id(text)                                    "org/name" or "org/name@revision", not a local path
    resolve_dataset(spec) -> DatasetFiles              "org/name[@revision][:subset][:split]" -> local files

huggingface_hub does the work, so its conventions hold exactly: the cache (HF_HOME, HF_HUB_CACHE, or
~/.cache/huggingface/hub, as transformers and `hf download` fill it), HF_HUB_OFFLINE=1 (read from the
cache, never the network), and the token (HF_TOKEN or `hf auth login`) for gated repos. Only the files read
are downloaded: a data set's card, then its listing decides the splits and only the split asked for is
fetched (tests/test_hub.py checks this against a Hub on localhost that speaks its HTTP API).
hf_io.resolve_model resolves model ids with `snapshot`; data/loaders.py dataset ids with `resolve_dataset`.

A dataset id names the files of one split of one subset ("config" in the `datasets` library): the dataset
card's `configs:` (README.md's YAML front matter: `config_name`, `data_files` with `split` and `path`
globs), as `datasets.load_dataset(repo, name=subset, split=split)` reads them; without `configs:`, the
repo's data files by the `datasets` library's rules (`data/train-00000-of-00001.parquet`, `train.jsonl`,
`my_train_file.json`, `dev/part-0.jsonl` for validation, or a lone `data.jsonl` for train).
The files are then read by our own loaders (JSONL, JSON, Parquet), with the same row-level errors as local
files. Without the `datasets` library: it would bring its own cache (Arrow files) beside the one users
have, and a dozen dependencies, to read a few JSONL or Parquet files that our loaders already read.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# "org/name" with the characters the Hub allows, optionally "@revision" (a branch, tag or commit).
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message names the id, the revision and what to do."""


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hub id rather than a local path: org/name[@revision], no file suffix,
    and nothing of that name on disk (a local directory of the same name wins, as in transformers)."""
    match = _ID.match(str(text))
    return bool(match) and not Path(text).exists() and not match["repo"].endswith(DATA_SUFFIXES)


def split_id(text: str) -> tuple[str, str | None]:
    """"org/name@revision" -> ("org/name", "revision"); no revision: None (the repo's main branch)."""
    match = _ID.match(text)
    if not match:
        raise HubError(f"{text!r} is not a Hub id (org/name or org/name@revision)")
    return match["repo"], match["revision"]


def snapshot(repo_id: str, revision: str | None, repo_type: str, patterns: list[str],
             commit: str | None = None, cache_only: bool = False) -> Path:
    """The snapshot folder of `repo_id` at `revision` in the HF cache, with the files matching `patterns`
    downloaded first when they are missing and the network is allowed. The folder is named after the
    commit it holds: a later call passes it as `commit` to read that same commit (messages still name
    `revision`, as the user wrote it). cache_only: never ask the Hub (as HF_HUB_OFFLINE=1 does).

    When the Hub cannot be reached or fails, the cache is read, as snapshot_download itself does for a
    branch or tag. Some releases (huggingface_hub 1.33) do not for a commit hash, the revision of every
    call after the first: they ask the Hub for that commit's file listing whenever the cache has none
    beside the snapshot (a cache filled by transformers' from_pretrained, which downloads file by file,
    or by an older client), even under HF_HUB_OFFLINE=1. So offline, the cache is asked for directly,
    and a failure that is not the Hub's answer about the repo falls back to it."""
    with _hub_errors(repo_id, revision, repo_type):
        from huggingface_hub import constants, errors, snapshot_download

        def download(local_files_only: bool) -> Path:
            return Path(snapshot_download(repo_id, repo_type=repo_type, revision=commit or revision,
                                          allow_patterns=patterns, local_files_only=local_files_only))

        if cache_only or constants.HF_HUB_OFFLINE:
            return download(True)
        try:
            return download(False)
        except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError):
            raise  # the Hub's answer: said as such by _hub_errors
        except Exception as failure:  # no connection (its type depends on the HTTP library), 5xx, 401, 429
            if isinstance(failure, OSError) and failure.errno is not None:
                raise  # this machine's own (a full disk, a permission), not the Hub's: said as it is
            try:
                return download(True)
            except errors.LocalEntryNotFoundError as missing:
                raise missing from failure


def repo_files(repo_id: str, revision: str | None, commit: str, repo_type: str) -> list[str]:
    """Every file of the repo at `commit` (paths in the repo), without downloading any: the listing
    recent huggingface_hub releases keep in the cache beside a snapshot they downloaded (that commit's: exact, and no
    request), else the Hub's listing, else (offline, or the Hub cannot be reached or refuses) the files of
    the cached snapshot."""
    with _hub_errors(repo_id, revision, repo_type):
        from huggingface_hub import HfApi, constants, errors

        try:
            from huggingface_hub import get_cached_repo_tree
            from huggingface_hub.errors import CachedRepoTreeNotFoundError
        except ImportError:  # older huggingface_hub
            pass
        else:
            try:
                return [f.path for f in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=commit)]
            except CachedRepoTreeNotFoundError:  # filled by something else (an older client, a copy)
                pass
        if not constants.HF_HUB_OFFLINE:
            try:
                return HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=commit)
            except errors.RevisionNotFoundError:  # said as such (snapshot_download raises it too)
                raise
            except Exception:  # no connection (its type depends on the HTTP library), the Hub down (5xx),
                pass           # rate-limited (429), a token gone: the cache, as snapshot_download falls back to it
    folder = snapshot(repo_id, revision, repo_type, [], commit, cache_only=True)
    return [f.relative_to(folder).as_posix() for f in sorted(folder.rglob("*")) if f.is_file()]


def hf_cli(command: str) -> str:
    """A command of huggingface_hub's CLI ("download", "login") as the installed version spells it: `hf
    download`, `hf auth login` since 0.34 (`huggingface-cli` is gone since 1.0), `huggingface-cli ...` before."""
    import huggingface_hub

    if tuple(int(part) for part in huggingface_hub.__version__.split(".")[:2]) < (0, 34):
        return f"huggingface-cli {command}"
    return "hf auth login" if command == "login" else f"hf {command}"


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, repo_type: str):
    """huggingface_hub's errors as one HubError naming the repo, the revision and what to do."""
    try:
        from huggingface_hub import constants, errors
    except ImportError:
        raise ImportError(f"{repo_id}: reading a Hub id needs huggingface_hub (pip install huggingface_hub)") from None
    kind = "dataset" if repo_type == "dataset" else "model"
    where = f"{kind} {repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        yield
    except errors.GatedRepoError:
        raise HubError(f"{where} is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
                       f"({hf_cli('login')}, or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no such {kind} on the Hub (or it is private: log in with {hf_cli('login')}, "
                       "or set HF_TOKEN); a local folder of that name would be used instead") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: no such revision (a branch, tag or commit of the repo)") from None
    except errors.LocalEntryNotFoundError:
        offline = constants.HF_HUB_OFFLINE
        raise HubError(f"{where} is not in the Hugging Face cache {constants.HF_HUB_CACHE}"
                       + (" and HF_HUB_OFFLINE=1 forbids downloading it" if offline else " and the Hub cannot be reached")
                       + f": run `{hf_cli('download')} {'--repo-type dataset ' if kind == 'dataset' else ''}{repo_id}"
                       + (f" --revision {revision}" if revision else "") + "` where there is network (with the same "
                       "HF_HOME), or point HF_HOME / HF_HUB_CACHE at the cache that has it") from None


# ----------------------------------------------------------------------------------------------
# Data sets

@dataclass(frozen=True)
class DatasetFiles:
    name: str          # the spec as the user wrote it, for messages
    files: tuple[Path, ...]


def resolve_dataset(spec: str) -> DatasetFiles:
    """"org/name[@revision][:subset][:split]" -> the split's files in the HF cache. The subset is a config
    of the dataset card (default: the card's default config); the split defaults to train. One name
    after the id is a subset if the card has a config of that name, else a split."""
    repo_part, *names = spec.split(":")
    repo_id, revision = split_id(repo_part)
    if len(names) > 2 or not all(names):
        raise HubError(f"{spec!r}: a dataset id is org/name[@revision][:subset][:split]")
    card_folder = snapshot(repo_id, revision, "dataset", ["README.md"])
    commit = card_folder.name  # the card's commit: the files are listed and read at that same commit
    configs, default = _card_configs(card_folder / "README.md")
    subset, split = (names + [None, None])[:2]
    if len(names) == 1 and names[0] not in configs:
        subset, split = None, names[0]
    if configs:
        if subset is None and default is None and len(configs) > 1:
            raise HubError(f"{spec}: name a subset; {repo_id} has several: {', '.join(configs)}")
        subset = subset or default or next(iter(configs))
        if subset not in configs:
            raise HubError(f"{spec}: {repo_id} has no subset {subset!r}; its subsets: {', '.join(configs)}")
        by_split = configs[subset]
    else:
        if subset is not None:
            raise HubError(f"{spec}: {repo_id}'s card declares no subsets (configs); give only a split")
        # the repo's listing decides the splits, so that only the split asked for is downloaded
        by_split = _splits_from_paths(repo_files(repo_id, revision, commit, "dataset"))
    split = split or "train"
    if split not in by_split:
        raise HubError(f"{spec}: no split {split!r} in {repo_id}" + (f" ({subset})" if subset else "")
                       + f"; its splits: {', '.join(by_split) or 'none found'}")
    folder = snapshot(repo_id, revision, "dataset", by_split[split], commit)
    files = sorted({f for pattern in by_split[split] for f in folder.glob(pattern) if f.is_file()})
    if not files:
        raise HubError(f"{spec}: the files of split {split!r} ({', '.join(by_split[split])}) are not in the "
                       f"cached snapshot {folder}; download them with `{hf_cli('download')} --repo-type "
                       f"dataset {repo_id}`")
    return DatasetFiles(spec, tuple(files))


def _card_configs(readme: Path) -> tuple[dict[str, dict[str, list[str]]], str | None]:
    """(config name -> split -> path globs, the default config's name), from the card's `configs:`
    (empty without one). The default: the config marked `default: true`, else one named "default"."""
    if not readme.is_file():
        return {}, None
    from huggingface_hub.repocard import metadata_load

    found, default = {}, None
    for config in (metadata_load(readme) or {}).get("configs") or []:
        name = config.get("config_name", "default")
        files = config.get("data_files", [])
        if isinstance(files, str) or (isinstance(files, list) and files and not isinstance(files[0], dict)):
            files = [{"split": "train", "path": files}]  # a glob or a list of globs: one train split
        found[name] = {f["split"]: [f["path"]] if isinstance(f["path"], str) else list(f["path"]) for f in files}
        if config.get("default") or (default is None and name == "default"):
            default = name
    return found, default


# A repo without `configs:` is split as the `datasets` library splits it (its data_files.py; the Hub's
# "File names and splits" page). The first of these rules that finds a data file decides, and files that
# rule does not place are not read:
#   1. data/{split}-00000-of-00003*.* (push_to_hub's shards): any split name
#   2. a directory named after a split: train/, data/dev/, my-test-set/, ...
#   3. a file named after a split: train.jsonl, my_train_file.json, test1.parquet, ...
#   4. neither: every data file is the train split (data.jsonl)
# "Named after": one of the split's keywords, preceded by the start of the name or a separator
# (- . _ space digit), and followed by one (a directory's name may also end with it).
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_SEP = "[-._ 0-9]"
_SHARDED = re.compile(r"data/(?P<split>\w+(?:\.\w+)*)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*")


def _splits_from_paths(repo_paths: list[str]) -> dict[str, list[str]]:
    """Without `configs:`: split -> the data files (paths in the repo) of that split, by the rules above;
    train, validation and test first, in that order."""
    paths = sorted(p for p in repo_paths if p.endswith(DATA_SUFFIXES))
    # hidden files and folders, and __pycache__-like ones, are not data (as in `datasets`)
    paths = [p for p in paths if not any(part.startswith((".", "__")) for part in p.split("/"))]
    sharded = {}
    for path in paths:
        if match := _SHARDED.fullmatch(path):
            sharded.setdefault(match["split"], []).append(path)
    if sharded:
        usual = list(SPLIT_KEYWORDS)
        return {split: sharded[split] for split in sorted(sharded, key=lambda split: (
            usual.index(split) if split in usual else len(usual), split))}
    for in_directory in (True, False):
        splits = {}
        for split, keywords in SPLIT_KEYWORDS.items():
            named = re.compile(rf"(^|{_SEP})({'|'.join(keywords)})({_SEP}{'|$' if in_directory else ''})")
            for path in paths:
                *directories, name = path.split("/")
                if any(named.search(part) for part in (directories if in_directory else [name])):
                    splits.setdefault(split, []).append(path)
        if splits:
            return splits
    return {"train": paths} if paths else {}
