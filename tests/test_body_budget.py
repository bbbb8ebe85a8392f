"""Request bodies held in memory at once are bounded per process (handlers/body_budget.py): the audit found
8 concurrent 60 MB chat bodies took the API from 55 MB to 1.25 GB, with nothing bounding how many arrive."""
from __future__ import annotations

from typing import Iterator

from fastapi.testclient import TestClient

from entrypoints.bootstrap import build_openrouter_app
from tests.api_support import make_api

MB = 1024 * 1024


def _upload_url(api) -> str:
    r = api.client.post("/v1/uploads", json={"filename": "a.wav"})
    assert r.status_code == 200, r.text
    return r.json()["data"]["upload_url"]


def test_bodies_past_the_budget_are_503_and_their_bytes_are_given_back(settings):
    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1, rate_limit_rps=0)  # budget: 2 x 4 MB
    budget = api.client.app.state.body_budget
    assert budget.limit == 8 * MB
    assert budget.take(7 * MB)  # bodies of other requests in flight
    url = _upload_url(api)
    r = api.client.put(url, content=b"\1" * MB + b"\1")  # its Content-Length says it cannot fit: refused at once
    assert r.status_code == 503 and r.headers["Retry-After"] and "Server busy" in r.json()["detail"], r.text

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused at the chunk that crosses the budget
        for _ in range(3):
            yield b"\1" * (MB // 2)
    r = api.client.put(url, content=chunked())
    assert r.status_code == 503 and "Server busy" in r.json()["detail"], r.text
    assert budget.held == 7 * MB  # what the refused requests counted is given back
    budget.give(7 * MB)
    assert api.client.put(url, content=b"\1" * MB).status_code == 200  # room again
    assert budget.held == 0


def test_the_chat_app_beside_the_api_shares_its_budget(settings):
    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1, rate_limit_rps=0)
    chat = TestClient(build_openrouter_app(api.settings, api.client.app))
    api.client.app.state.body_budget.take(8 * MB)
    r = chat.post("/v1/chat/completions", content=b"{" + b" " * MB + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 503, r.text
    api.client.app.state.body_budget.give(8 * MB)


def test_a_mounted_chat_app_counts_a_body_once(settings):
    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1, rate_limit_rps=0)
    app = api.client.app
    app.mount("/openrouter", build_openrouter_app(api.settings, app))  # as entrypoints/lambda_api.py does
    app.state.body_budget.take(6 * MB + MB // 2)  # room for 1.5 MB: a 1 MB body counted twice would not fit
    body = b'{"messages": "' + b"x" * MB + b'"}'
    r = api.client.post("/openrouter/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "messages" in r.json()["detail"], r.text
