"""A Hugging Face Hub on localhost: enough of its HTTP API for huggingface_hub to resolve, list and download
repos, so that a test can run the online path (HF_ENDPOINT=hub.endpoint) and see what was fetched.

    with FakeHub({("model", "org/name"): {"config.json": b"...", ...}}, gated={"org/gated"}) as hub:
        ... run something with HF_ENDPOINT=hub.endpoint ...
        hub.downloads  # the repo paths whose bytes were sent, in order

What it answers, as the Hub does (huggingface_hub's hf_api.py and file_download.py read these):
    GET  /api/{models,datasets}/{repo}/revision/{rev}     {"id", "sha", "siblings"}
    GET  /api/{models,datasets}/{repo}/tree/{rev}[/dir]   [{"type", "path", "oid", "size"}] (recursive=...)
    HEAD /[datasets/]{repo}/resolve/{rev}/{path}          X-Repo-Commit, ETag, Content-Length
    GET  the same                                         the file's bytes
and the errors with their X-Error-Code: RepoNotFound (404), GatedRepo (403), RevisionNotFound (404),
EntryNotFound (404); with `down` set (503, 429), that status to every request. A revision is "main" or the
repo's commit (one commit per repo).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[tuple[str, str], dict[str, bytes | str]], gated: set[str] = frozenset()):
        self.repos = {key: {path: data.encode() if isinstance(data, str) else data for path, data in files.items()}
                      for key, files in repos.items()}
        self.commits = {key: hashlib.sha1(json.dumps(sorted(files)).encode()
                                          + b"".join(files[p] for p in sorted(files))).hexdigest()
                        for key, files in self.repos.items()}
        self.gated = set(gated)
        self.downloads: list[str] = []
        self.down: int | None = None  # an HTTP status (503: the Hub down, 429: rate-limited) answered to every request
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def route(self, method: str, url: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request."""
        if self.down is not None:
            return self.down, {}, b"the Hub is unavailable"
        parts = urlsplit(url)
        path = [unquote(p) for p in parts.path.strip("/").split("/")]
        if path[0] == "api" and path[1] in ("models", "datasets") and len(path) >= 6:
            kind, repo_id, action, revision, inside = path[1][:-1], "/".join(path[2:4]), path[4], path[5], path[6:]
        else:
            kind = "dataset" if path[0] == "datasets" else "model"
            path = path[1:] if kind == "dataset" else path
            if len(path) < 5 or path[2] != "resolve":
                return 404, {}, b"not a Hub route"
            repo_id, action, revision, inside = "/".join(path[:2]), "resolve", path[3], path[4:]
        files = self.repos.get((kind, repo_id))
        if files is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found"
        if repo_id in self.gated:
            return 403, {"X-Error-Code": "GatedRepo"}, b"Access to this repo is restricted"
        commit = self.commits[(kind, repo_id)]
        if revision not in ("main", commit):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id"
        if action == "revision":
            info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": p} for p in sorted(files)]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if action == "tree":
            return 200, {"Content-Type": "application/json"}, json.dumps(
                self._tree(files, "/".join(inside), parse_qs(parts.query).get("recursive", [""])[0].lower() in ("true", "1"))).encode()
        name = "/".join(inside)
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound"}, b"Entry not found"
        data = files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        if method == "GET":
            self.downloads.append(name)
        return 200, headers, data

    @staticmethod
    def _tree(files: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            *parents, _ = path[len(prefix):].split("/")
            for depth in range(1, len(parents) + 1):
                folders.add(prefix + "/".join(parents[:depth]))
            if recursive or not parents:
                entries.append({"type": "file", "path": path, "size": len(files[path]),
                                "oid": hashlib.sha1(files[path]).hexdigest()})
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                    for d in sorted(folders) if recursive or "/" not in d[len(prefix):]]
        return entries


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method):
            status, headers, body = hub.route(method, self.path)
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if method == "GET":
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's names)
            self._answer("GET")

        def do_HEAD(self):  # noqa: N802
            self._answer("HEAD")

        def log_message(self, *args):  # quiet
            pass

    return Handler
