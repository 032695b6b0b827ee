"""A Hugging Face cache in its real on-disk layout, built in a test's tmp dir (nothing is downloaded).

    <cache>/models--org--name/blobs/<sha256>                 each file's bytes, once
    <cache>/models--org--name/refs/<branch or tag>           the commit it points to
    <cache>/models--org--name/snapshots/<commit>/<path>      a relative symlink to its blob
    <cache>/datasets--org--name/...                          the same for a dataset

This is what `hf download` (`huggingface-cli download`) and transformers leave behind, and what huggingface_hub reads
with HF_HUB_OFFLINE=1 (its HF_HUB_CACHE, or HF_HOME/hub).

    add_repo(cache, "org/name", {"config.json": b"...", ...}, kind="model", refs=("main",)) -> commit
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes | str | Path], kind: str = "model",
             refs=("main",), commit: str | None = None) -> str:
    """One commit of a repo: `files` (repo path -> bytes, text or a file to copy), its refs pointing to it.
    Returns the commit hash (40 hex digits, derived from the contents unless given)."""
    root = Path(cache) / f"{kind}s--{repo_id.replace('/', '--')}"
    contents = {}
    for path, value in files.items():
        contents[path] = Path(value).read_bytes() if isinstance(value, Path) else \
            value.encode() if isinstance(value, str) else value
    commit = commit or hashlib.sha1(b"".join(p.encode() + c for p, c in sorted(contents.items()))).hexdigest()
    for path, data in contents.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def add_folder(cache: Path, repo_id: str, folder: Path, kind: str = "model", refs=("main",), commit=None) -> str:
    """Every file of `folder` as one commit of `repo_id`."""
    files = {f.relative_to(folder).as_posix(): f for f in sorted(Path(folder).rglob("*")) if f.is_file()}
    return add_repo(cache, repo_id, files, kind, refs, commit)
