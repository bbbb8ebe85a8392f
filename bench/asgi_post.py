"""One JSON POST handed straight to an ASGI app, with no HTTP client or socket, so the in-process benches
(gc_pauses.py, queued_polls.py) time the server's own work.

Standard library only: the benches' children import it from this folder next to another checkout's code.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def post_scope(path: str, body: bytes) -> Scope:
    """The HTTP scope of a JSON POST of `body` to `path` (made once, reused for every call)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8001)}


async def post(app: App, scope: Scope, body: bytes) -> None:
    """Runs one request through the app and fails unless it answered 200."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}
    status = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
    await app(dict(scope), receive, send)  # a copy: the app may write into its scope
    assert status == [200], status
