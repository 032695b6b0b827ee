"""Files on disk, whole or not at all, and JSON lines: what every script writes below the Hugging Face
format (hf_io.py) and the training checkpoints (checkpoint.py), which build on it.

    with atomic_directory(path) as tmp: ...    a directory that appears whole or not at all
    atomic_write(path, text)                   the same for one file
    write_json(path, obj), write_jsonl(path, rows)
    read_jsonl(path)                           the records of a JSONL/JSON file, a damaged line named
    lock_out_dir(path), release_out_dirs()     one run at a time in an output folder (an flock)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path


def fsync_tree(directory: Path):
    """Every file below `directory` on disk (before a rename makes them visible)."""
    for f in sorted(Path(directory).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


class atomic_directory:
    """`with atomic_directory(path) as tmp:` write into tmp; on success tmp replaces path.

    A crash while writing leaves the old directory untouched (and a stray `.tmp-*` sibling). An
    existing `path` is first renamed to `.old-*`, so between the two renames (microseconds) only
    that sibling holds the old version; training checkpoints avoid even that
    by writing a new directory per step and switching a `latest` file (checkpoint.py)."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".tmp-{self.path.name}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.filename is None:  # a write() on a full disk names no file
                exc.filename = str(self.path)
            return False
        fsync_tree(self.tmp)
        old = None
        if self.path.exists():
            old = self.path.parent / f".old-{self.path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def atomic_write(path, content: str | bytes):
    """Replace one file at once (write a sibling, fsync, rename over), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as error:  # a full disk, a Ctrl-C: no half-written sibling left behind
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)
        raise
    os.replace(tmp, path)


def write_json(path, obj):
    """Atomically write a JSON file (creating its directory)."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows):
    """Atomically: a step killed while writing leaves no half-written product."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path) -> list[dict]:
    """The records of a file a script wrote (the data loaders' reader: a damaged line is named)."""
    from data.loaders import read_records

    return [record for _, record in read_records(path)]


_LOCKS: dict[str, int] = {}  # out dir -> the open lock file this process holds (one per process and folder)


def lock_out_dir(out_dir) -> str | None:
    """Take the run's lock on out_dir (created if missing): None when this process holds it (now or already),
    else who holds it ("pid 123 on host, since ..."), as that process wrote it into the lock file."""
    path = Path(out_dir) / ".run.lock"
    if str(path.resolve()) in _LOCKS:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 512).decode(errors="replace").strip()
        os.close(fd)
        return holder or "a process that has not written its pid yet"
    except OSError:  # no flock on this filesystem: run unlocked
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _LOCKS[str(path.resolve())] = fd  # held until release_out_dirs() or the end of this process
    return None


def release_out_dirs():
    """Let go of every out_dir lock this process holds (cli.run, when a script's main() has ended)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])
