"""/query_result serves finished entries from a per-window cache; everything else from the store."""
from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient

from service import signed_urls as signing
from handlers.app import create_app
from handlers.result_cache import FinishedEntries
from service.records import FailureReason
from service.worker import Worker
from tests.support_engine import SineEngine


class Counting:
    """Counts calls of one store method (the cache's whole point is not to make them)."""

    def __init__(self, store, name: str):
        self.calls: list[list[str]] = []
        original = getattr(store, name)

        def wrapped(ids):
            self.calls.append(list(ids))
            return original(ids)

        setattr(store, name, wrapped)


@pytest.fixture
def api(settings, backend):
    client = TestClient(create_app(settings, backend))
    worker = Worker(settings, backend, SineEngine(settings.model_names), worker_id="cache-test")
    return client, worker, backend


def submit(client, **payload) -> str:
    r = client.post("/release_task", json={"prompt": "x", "duration": 10, **payload})
    assert r.status_code == 200, r.text
    return r.json()["data"]["task_id"]


def poll(client, *ids: str) -> tuple[list[dict], dict]:
    r = client.post("/query_result", json={"task_id_list": list(ids)})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    return body["data"], body


def test_a_task_that_finishes_shows_its_result_on_the_next_poll(api):
    client, worker, backend = api
    task_id = submit(client)
    before, _ = poll(client, task_id)
    assert before[0]["status"] == 0 and json.loads(before[0]["result"])[0]["stage"] == "queued"
    assert worker.run_once(0.01)
    after, _ = poll(client, task_id)
    assert after[0]["status"] == 1
    item = json.loads(after[0]["result"])[0]
    assert item["stage"] == "succeeded" and item["file"].startswith("/v1/audio?path=")


def test_finished_entries_come_from_the_cache_without_reading_the_store(api):
    client, worker, backend = api
    done = submit(client)
    bad = submit(client, prompt="PLEASE FAIL")  # the sine engine fails it with a reason
    while worker.run_once(0.01):
        pass
    queued_later = submit(client)
    first, envelope = poll(client, done, bad, queued_later, "missing-id", done)
    assert [e["status"] for e in first] == [1, 2, 0, 2, 1]
    assert envelope["code"] == 200 and envelope["error"] is None and isinstance(envelope["timestamp"], int)
    reads = Counting(backend.store, "get_many")
    second, _ = poll(client, done, bad, queued_later, "missing-id", done)
    assert second == first
    # The finished ones are not read again; the queued task and the unknown id are, unless the store
    # says nothing changed since (SQLite's change token; DynamoDB has none).
    assert reads.calls == ([] if backend.name == "embedded" else [sorted(["missing-id", queued_later])])
    third, _ = poll(client, bad, done)
    assert third == [first[1], first[0]] and len(reads.calls) == (0 if backend.name == "embedded" else 1)


def test_a_still_waiting_poll_reads_nothing_until_the_store_changes(api):
    """Issue 21.19: queued polls cost 2.5x a bare route (finished ones came from a cache, waiting ones
    were read every time). They are now kept while the store's change token holds, and every change
    (a claim, progress, a submit) shows on the next poll."""
    client, worker, backend = api
    first, second = submit(client), submit(client)
    stage = lambda entry: json.loads(entry["result"])[0]["stage"]  # noqa: E731
    before, _ = poll(client, first, second)
    reads = Counting(backend.store, "get_many")
    assert poll(client, first, second)[0] == before and poll(client, second)[0] == [before[1]]
    # get_many's ids in any order: which ids a poll still needs is a set
    assert [sorted(c) for c in reads.calls] == ([] if backend.name == "embedded" else [sorted([first, second]), [second]])
    record = backend.store.claim(first, "w")  # a worker takes the first: both entries change
    claimed, _ = poll(client, first, second)
    assert stage(claimed[0]) == "running" and claimed[1] != before[1]
    backend.store.update_progress(first, record.attempt, 0.5, "dit")
    assert stage(poll(client, first)[0][0]) == "dit"
    backend.store.finish(first, record.attempt, error="stopped", reason=FailureReason.ENGINE_ERROR)
    assert poll(client, first, second)[0][0]["status"] == 2


def test_signed_urls_move_to_the_next_window_and_still_play(api, settings, monkeypatch):
    client, worker, backend = api
    task_id = submit(client)
    assert worker.run_once(0.01)
    now = time.time()
    url = json.loads(poll(client, task_id)[0][0]["result"])[0]["file"]
    assert json.loads(poll(client, task_id)[0][0]["result"])[0]["file"] == url  # same window: same URL
    later = now + 2 * signing._ROUND
    monkeypatch.setattr(signing.time, "time", lambda: later)
    rolled = json.loads(poll(client, task_id)[0][0]["result"])[0]["file"]
    expires = lambda u: int(parse_qs(urlparse(u).query)["expires"][0])  # noqa: E731
    assert expires(rolled) > expires(url) and rolled.split("&")[0] == url.split("&")[0]
    query = parse_qs(urlparse(rolled).query)
    assert signing.verify(signing.url_keys(backend), "audio", query["path"][0], query["expires"][0], query["sig"][0])
    if backend.name == "embedded":  # (on moto, S3 would see the shifted clock too)
        assert client.get(rolled).status_code == 200


def test_the_cache_keeps_at_most_its_size_and_drops_the_least_recently_used():
    cache = FinishedEntries(max_entries=2)
    cache.put("a", 1, b"A")
    cache.put("b", 1, b"B")
    assert cache.get("a", 1) == b"A"  # a is now the most recent
    cache.put("c", 1, b"C")
    assert cache.get("b", 1) is None and cache.get("a", 1) == b"A" and cache.get("c", 1) == b"C"
    assert cache.get("a", 2) is None  # another window: rebuilt by the caller
    assert len(cache) == 2
