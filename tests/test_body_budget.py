"""Request bodies held in memory at once are bounded per process (handlers/body_budget.py): the audit found
8 concurrent 60 MB chat bodies took the API from 55 MB to 1.25 GB, with nothing bounding how many arrive."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Iterator

from fastapi.testclient import TestClient

from entrypoints.bootstrap import build_openrouter_app
from service.caller_limits import Caller
from tests.api_support import KEY, make_api

MB = 1024 * 1024


def _upload_url(api) -> str:
    r = api.client.post("/v1/uploads", json={"filename": "a.wav"})
    assert r.status_code == 200, r.text
    return r.json()["data"]["upload_url"]


def test_bodies_past_the_budget_are_503_and_their_bytes_are_given_back(settings):
    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1, rate_limit_rps=0)  # budget: 2 x 4 MB
    budget = api.client.app.state.body_budget
    assert budget.limit == 8 * MB
    assert budget.take(7 * MB) is None  # bodies of other requests in flight
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


def _scope(path: str, client: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    """An HTTP request's ASGI scope with no Content-Length: the body is counted as it arrives."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), *headers], "client": (client, 1),
            "server": ("127.0.0.1", 8001)}


async def _call(app, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """The answer's status and JSON body."""
    answer: dict[str, Any] = {"body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return {"status": answer["status"], "json": json.loads(answer["body"])}


def _slow(first: bytes, go: asyncio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A slow client: `first`, then the rest of its body never comes until the test sets `go`."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        await go.wait()
        return {"type": "http.request", "body": b"", "more_body": False}
    return receive


def _whole(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


def test_one_client_holding_its_share_cannot_refuse_another_clients_body(settings):
    """/release_task reads its body before it can authenticate (the key may be its ai_token): slow anonymous
    bodies from one address took the whole budget, and every other caller got 503. Now one address holds at
    most its share (one largest body: half the budget) and its further bodies are the ones refused. Its
    requests without a body are answered, and so is a valid key from that address (behind a proxy every
    anonymous client has the proxy's address): a key is its own caller with its own share."""
    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1, rate_limit_rps=0, api_key=KEY)  # budget 8 MB, share 4 MB
    app, budget = api.client.app, api.client.app.state.body_budget
    assert (budget.limit, budget.per_client) == (8 * MB, 4 * MB)
    piece = b" " * (3 * MB // 2)  # under /release_task's 2 MB: its route waits for the rest

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]], int]:
        go = asyncio.Event()

        hogs = [asyncio.create_task(_call(app, _scope("/release_task", "10.0.0.1", []), _slow(piece, go)))
                for _ in range(5)]
        for _ in range(200):  # until its first pieces are counted or refused
            await asyncio.sleep(0.01)
            if sum(t.done() for t in hogs) == 2:
                break
        held_by_hog = budget.held_by(Caller.at("10.0.0.1").id)
        body = json.dumps({"prompt": "x", "ai_token": KEY}).encode() + piece
        other = await _call(app, _scope("/release_task", "10.0.0.2", []), _whole(body))
        same_address = [  # a GET, and a valid key's body: neither is the slow bodies' caller
            await _call(app, _scope("/health", "10.0.0.1", [], method="GET"), _whole(b"")),
            await _call(app, _scope("/release_task", "10.0.0.1", [(b"authorization", f"Bearer {KEY}".encode())]),
                        _whole(json.dumps({"prompt": "x"}).encode() + piece))]
        go.set()
        return list(await asyncio.gather(*hogs)), other, same_address, held_by_hog

    hogs, other, same_address, held_by_hog = asyncio.run(scenario())
    assert other["status"] == 200, other  # room beside the other address's bodies
    assert [a["status"] for a in same_address] == [200, 200], same_address
    assert held_by_hog == 3 * len(piece)  # 4.5 MB: the piece that crossed its share counted
    refused = [h for h in hogs if h["status"] == 503]
    assert len(refused) == 2 and "for this client" in refused[0]["json"]["detail"], hogs
    assert budget.held == 0 and budget.held_by(Caller.at("10.0.0.1").id) == 0  # all given back


def test_a_wrong_bearer_key_is_refused_before_the_body_is_read(settings):
    app = make_api(settings, api_key=KEY).client.app
    reads: list[int] = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b'{"prompt": "x", "ai_token": "' + KEY.encode() + b'"}',
                "more_body": False}

    for header in (b"Bearer wrong", b"wrong"):  # a Bearer key, or a raw one
        wrong = _scope("/release_task", "10.0.0.3", [(b"authorization", header)])
        answer = asyncio.run(_call(app, wrong, receive))
        assert answer["status"] == 401 and answer["json"]["detail"] == "Invalid API key", answer
        assert reads == []  # nothing of the body was read (or counted against the budget)
    right = _scope("/release_task", "10.0.0.3", [(b"authorization", f"Bearer {KEY}".encode())])
    assert asyncio.run(_call(app, right, receive))["status"] == 200 and reads == [1]


def test_one_key_is_a_share_per_address_apart_from_the_anonymous_bodies_there(settings):
    """A deployment usually gives all its clients one ACESTEP_API_KEY: keyed by the key alone, keyed uploads
    from several addresses pooled into one share, and once they held one largest body every keyed body from
    anywhere was a 503. The share is the key's holder at an address: the same key elsewhere has its own, and
    so do the anonymous bodies at that address (each is refused only past its own)."""
    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1, rate_limit_rps=0, api_key=KEY)  # budget 8 MB, share 4 MB
    app, budget = api.client.app, api.client.app.state.body_budget
    keyed = [(b"authorization", f"Bearer {KEY}".encode())]
    piece = b" " * (3 * MB // 2)
    body = json.dumps({"prompt": "x"}).encode() + piece
    anonymous = json.dumps({"prompt": "x", "ai_token": KEY}).encode() + piece  # authenticated once read

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        go = asyncio.Event()

        hogs = [asyncio.create_task(_call(app, _scope("/release_task", "10.0.0.1", keyed), _slow(piece, go)))
                for _ in range(3)]
        for _ in range(200):  # until the key's holder at 10.0.0.1 holds its share (3 x 1.5 MB)
            await asyncio.sleep(0.01)
            if budget.held >= 3 * len(piece):
                break
        answers = [
            await _call(app, _scope("/release_task", "10.0.0.1", keyed), _whole(body)),  # past its share
            await _call(app, _scope("/release_task", "10.0.0.2", keyed), _whole(body)),  # the key elsewhere
            await _call(app, _scope("/release_task", "10.0.0.1", []), _whole(anonymous))]  # anonymous beside it
        go.set()
        return list(await asyncio.gather(*hogs)), answers

    hogs, answers = asyncio.run(scenario())
    assert [a["status"] for a in answers] == [503, 200, 200], answers
    assert "for this client" in answers[0]["json"]["detail"], answers
    assert all(h["status"] != 503 for h in hogs), hogs
    assert budget.held == 0
