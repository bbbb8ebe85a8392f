"""A local stand-in for the Hugging Face hub, over real HTTP: the hub is the boundary, so the code under test
runs huggingface_hub itself (model_info, snapshot_download, hf_hub_download) against this server, with
HF_ENDPOINT pointing at it.

It speaks the part of the hub's API those calls use:
    GET  /api/models/<repo>/revision/<rev>     the commit a revision names and each file (size, sha256 for LFS)
    GET  /api/models/<repo>/tree/<rev>[/<dir>] the file listing snapshot_download downloads from
    HEAD/GET /<repo>/resolve/<rev>/<path>      one file, with the commit / etag / size headers
`down = True` answers 503 to everything (a hub outage); `url_when_down()` is an address nothing listens on
(the network is gone). `published_repo()` turns a folder the code built (a tiny checkpoint in the published
layout) into a repo's files.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from engine.weights.demo_marker import DEMO_MARKER

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_THRESHOLD = 100  # files larger than this are "LFS" files: the hub gives their sha256


def published_repo(folder: Path, drop_marker: bool = True) -> dict[str, bytes]:
    """Every file under `folder` by its repo path. The demo marker is dropped by default: the hub serves the
    tiny checkpoint as this test's published (real) weights, so the loader must treat it as such."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not (drop_marker and p.name == DEMO_MARKER)}


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = COMMIT):
        self.repos, self.commit = repos, commit
        self.down = False
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-hub")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_downloads(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    # -- the API ---------------------------------------------------------------------------------
    def _split(self, rest: str) -> tuple[str, str]:
        """'<org>/<name>/<tail>' -> (repo, tail) for a repo this hub holds."""
        for repo in self.repos:
            if rest == repo or rest.startswith(repo + "/"):
                return repo, rest[len(repo) + 1:]
        raise KeyError(rest)

    def _entry(self, path: str, data: bytes, key: str) -> dict:
        entry = {key: path, "size": len(data), ("blobId" if key == "rfilename" else "oid"): _oid(data)}
        if len(data) > LFS_THRESHOLD:
            sha = hashlib.sha256(data).hexdigest()
            entry["lfs"] = {"sha256": sha, "oid": sha, "size": len(data), "pointerSize": 134}
        if key == "path":
            entry["type"] = "file"
        return entry

    def answer(self, method: str, raw_path: str) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, raw_path))
        if self.down:
            return 503, {"Content-Type": "application/json"}, b'{"error": "Service Unavailable"}'
        path = unquote(urlsplit(raw_path).path)
        try:
            if path.startswith("/api/models/"):
                repo, tail = self._split(path[len("/api/models/"):])
                kind, _, rest = tail.partition("/")
                files = self.repos[repo]
                if kind == "revision":
                    body = {"id": repo, "modelId": repo, "sha": self.commit, "private": False,
                            "siblings": [self._entry(p, d, "rfilename") for p, d in files.items()]}
                    return self._json(body)
                if kind == "tree":
                    prefix = rest.partition("/")[2]
                    listing = [self._entry(p, d, "path") for p, d in files.items()
                               if not prefix or p.startswith(prefix.rstrip("/") + "/")]
                    return self._json(listing)
            else:
                repo, tail = self._split(path.lstrip("/"))
                kind, _, rest = tail.partition("/")
                revision, _, file_path = rest.partition("/")
                if kind == "resolve" and file_path in self.repos[repo]:
                    data = self.repos[repo][file_path]
                    headers = {"X-Repo-Commit": self.commit, "ETag": f'"{_oid(data)}"',
                               "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
                    if len(data) > LFS_THRESHOLD:
                        headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                        headers["X-Linked-Size"] = str(len(data))
                    return 200, headers, data
        except KeyError:
            pass
        return 404, {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}, b'{"error": "not found"}'

    @staticmethod
    def _json(body) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, with_body: bool) -> None:
                status, headers, body = hub.answer(self.command, self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                self._reply(True)

            def do_HEAD(self):  # noqa: N802
                self._reply(False)

            def log_message(self, *args):
                pass

        return Handler


def url_when_down() -> str:
    """An address where nothing listens: connections are refused at once, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextmanager
def fake_hub(repos: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    hub = FakeHub(repos).start()
    try:
        yield hub
    finally:
        hub.stop()


def go_online(monkeypatch, endpoint: str) -> None:
    """This test process reaches the hub at `endpoint`: HF_HUB_OFFLINE unset (huggingface_hub read it once at
    import, when tests/conftest.py had set it, so its constant is reset too) and HF_ENDPOINT set, which the
    code reads at each call."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


def original_layout_repo(tmp_path: Path, name: str, seed: int = 7) -> dict[str, bytes]:
    """The main repo's files for one tiny DiT in ACE-Step's original layout, built by the code (the published
    layout: <name>/, vae/, Qwen3-Embedding-0.6B/), without the demo marker."""
    from engine.weights.checkpoints import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / name, seed=seed, model_name=name, layout="original")
    return published_repo(tmp_path)
