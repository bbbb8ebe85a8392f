"""Large multipart bodies stream to disk, and an upload is not read into memory before the key is
checked (issue 21, item 7: six unauthenticated 100 MB uploads took the API from 55 MB to 1.76 GB)."""
from __future__ import annotations

import tracemalloc
from typing import Iterator

import httpx

from tests.listener_support import listening

BOUNDARY = "hostile-upload"
MB = 1024 * 1024
UPLOAD_MB = 24


def _multipart(token: str | None) -> Iterator[bytes]:
    """A /release_task multipart body with a UPLOAD_MB source file, sent in 64 KB pieces."""
    if token is not None:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="ai_token"\r\n\r\n{token}\r\n'.encode()
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="task_type"\r\n\r\ncover\r\n'.encode()
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="src_audio"; filename="s.wav"\r\n'
           "Content-Type: audio/wav\r\n\r\n").encode()
    piece = b"\0" * (64 * 1024)
    for _ in range(UPLOAD_MB * MB // len(piece)):
        yield piece
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_an_unauthenticated_upload_is_refused_without_holding_it_in_memory(settings):
    with listening(settings, api_key="sk-real") as (host, port), httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as client:
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        tracemalloc.start()
        try:
            missing = client.post("/release_task", content=_multipart(None), headers=headers)
            wrong = client.post("/release_task", content=_multipart("nope"), headers=headers)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert missing.status_code == 401 and missing.json()["detail"] == "Missing ai_token or Authorization header"
    assert wrong.status_code == 401 and wrong.json()["detail"] == "Invalid ai_token"
    # The body was buffered whole (twice: the pieces and their join) before; now the parser's spool
    # holds at most 1 MB of a file and the rest goes to disk.
    assert peak < UPLOAD_MB * MB / 4, f"peak {peak / MB:.1f} MB for a {UPLOAD_MB} MB upload"
