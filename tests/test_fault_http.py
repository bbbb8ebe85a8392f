"""Small defects of issue 11 (defect 9): auth scheme case, truncated and slow bodies, sanitized task
errors, the queue limit under concurrent submits, orphan output files."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from starlette.requests import Request

from engine.request import GenerationRequest
from handlers.body import read_limited
from handlers.envelope import ApiError
from service.blob_keys import output_key, result_part_key
from service.embedded import make_embedded_backend
from service.embedded.orphans import collect_orphan_outputs
from service.ports import FAILED, QueueFull, SUCCEEDED
from service.submission import submit_task
from service.worker import Worker
from tests.api_support import KEY, make_api
from tests.worker_support import ScriptedEngine, submit


def test_the_bearer_scheme_is_case_insensitive(settings):
    api = make_api(settings, api_key=KEY)
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = api.client.post("/query_result", json={"task_id_list": []}, headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, (scheme, r.text)
    assert api.client.post("/query_result", json={}, headers={"Authorization": "bearer wrong"}).status_code == 401


def test_a_truncated_multipart_body_is_refused(settings):
    api = make_api(settings)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nrock\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"audio_duration\"\r\n\r\n10\r\n--XyZ--\r\n")
    ct = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    assert api.client.post("/release_task", content=body, headers=ct).status_code == 200
    cut = body[:body.index(b"--XyZ--")]  # the closing delimiter never arrived
    r = api.client.post("/release_task", content=cut, headers=ct)
    assert r.status_code == 400 and "truncated" in r.json()["detail"]


def _request(chunks: list[bytes], delay: float, content_length: int | None = None) -> Request:
    queue = list(chunks)

    async def receive():
        await asyncio.sleep(delay)
        chunk = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def test_a_slow_body_times_out_with_408():
    slow = _request([b"{", b"}"] * 20, delay=0.05)
    with pytest.raises(ApiError) as err:
        asyncio.run(read_limited(slow, 1000, timeout=0.3))
    assert err.value.status_code == 408
    assert asyncio.run(read_limited(_request([b"{}"], delay=0.0), 1000, timeout=0.3)) == b"{}"


def test_a_body_shorter_than_its_content_length_is_refused():
    with pytest.raises(ApiError) as err:
        asyncio.run(read_limited(_request([b"{\"a\":"], delay=0.0, content_length=40), 1000))
    assert err.value.status_code == 400 and "truncated" in err.value.detail


def test_task_errors_do_not_expose_heap_addresses_or_allocator_details(settings, backend):
    engine = ScriptedEngine()
    engine.error = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity; "
                                "caching allocator at 0x7f3a2b1c9e10)")
    oom = submit(backend)
    Worker(settings, backend, engine).run_once(1.0)
    engine.error = ValueError("bad tensor <torch.Tensor object at 0x7f00deadbeef> from /opt/app/engine/x.py")
    addr = submit(backend)
    Worker(settings, backend, engine).run_once(1.0)
    first, second = backend.store.get(oom), backend.store.get(addr)
    assert first.status == second.status == FAILED
    assert "ran out of memory" in first.error and "GiB" not in first.error and "0x7f" not in first.error
    assert "0x7f00deadbeef" not in second.error and "/opt/app" not in second.error and "ValueError" in second.error


def test_the_queue_limit_holds_exactly_under_concurrent_submits(settings):
    backend = make_embedded_backend(settings)  # moto in-process is not thread-safe: AWS is checked below
    request = GenerationRequest(audio_duration=10)
    accepted, refused = [], []
    start = threading.Barrier(12)

    def submitter():
        start.wait()
        for _ in range(3):
            try:
                accepted.append(submit_task(backend, request, 20)[0])
            except QueueFull:
                refused.append(1)

    threads = [threading.Thread(target=submitter) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 20 and len(refused) == 16
    assert backend.store.counts()["queued"] == 20


def test_output_files_of_abandoned_attempts_are_collected(settings):
    backend = make_embedded_backend(settings)
    engine = ScriptedEngine()
    task_id = submit(backend)
    # Attempt 1 wrote its file, then its worker died before recording the result.
    orphan = output_key(task_id, 1, 0, "wav")
    backend.blobs.put(orphan, b"RIFF...", "audio/wav")
    orphan_part = result_part_key(task_id, 1, "generation_info")  # a large result's part, same attempt
    backend.blobs.put(orphan_part, b"{}", "application/json")
    lease = backend.queue.receive(1.0, 30)
    backend.store.claim(task_id, "dead-worker")
    backend.queue.release(lease)
    Worker(settings, backend, engine).run_once(1.0)  # attempt 2 finishes it
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and orphan not in rec.blob_keys
    old = time.time() - 7200
    for key in [orphan, orphan_part, *rec.blob_keys]:
        os.utime(backend.blobs.local_path(key), (old, old))
    assert collect_orphan_outputs(backend.store, backend.blobs, time.time() - 3600) == 2
    assert backend.blobs.size(orphan) is None and backend.blobs.size(orphan_part) is None
    assert all(backend.blobs.size(k) for k in rec.blob_keys)


@pytest.mark.integration  # moto in-process
def test_the_aws_queue_limit_is_checked_in_the_create_transaction(tmp_path):
    """No approximate SQS count decides: a stale (empty) size cache in every API instance cannot overshoot."""
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path) as backend:
        request = GenerationRequest(audio_duration=10)
        for _ in range(5):
            submit_task(backend, request, 5)
        backend.queue._cached_size, backend.queue._cached_at = 0, time.monotonic() + 3600  # looks empty
        with pytest.raises(QueueFull):
            submit_task(backend, request, 5)
        assert backend.store.counts()["queued"] == 5 and backend.store.counts()["total"] == 5
