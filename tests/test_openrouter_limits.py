"""The chat route applies /release_task's limits: the task cost ceiling (413), the per-caller tasks
in flight and the per-caller request rate (429 with Retry-After), counted across both APIs of a
process as the entry points wire them (bootstrap.build_openrouter_app beside the ACE-Step app)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from entrypoints.bootstrap import build_openrouter_app
from handlers.app import create_app
from service.embedded import make_embedded_backend

KEY = "sk-limits"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "<prompt>lo-fi piano</prompt>"}],
        "audio_config": {"duration": 30}, "inference_steps": 8}


def _apps(settings, **overrides):
    """(ACE-Step client, chat client) on one backend, no worker: tasks stay queued."""
    settings = settings.model_copy(update={"api_key": KEY, **overrides})
    backend = make_embedded_backend(settings)
    api = create_app(settings, backend)
    return TestClient(api), TestClient(build_openrouter_app(settings, api)), backend


@pytest.mark.parametrize("listener", ["chat", "api"])
def test_a_chat_task_over_the_cost_ceiling_is_413(settings, listener):
    api, chat, backend = _apps(settings, max_task_cost=1000)
    client = chat if listener == "chat" else api  # the completions are served on the ACE-Step listener too
    r = client.post("/v1/chat/completions", json={**CHAT, "audio_config": {"duration": 600}}, headers=AUTH)
    assert r.status_code == 413 and "ACESTEP_MAX_TASK_COST" in r.json()["detail"], r.text
    assert backend.queue.size() == 0


def test_chat_tasks_count_toward_the_callers_tasks_in_flight_on_both_apis(settings):
    api, chat, backend = _apps(settings, caller_max_queued=1, openrouter_max_wait=0.2)
    r = chat.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert r.status_code == 504 and r.headers["X-Task-ID"] in r.json()["detail"]  # queued, goes on
    r = api.post("/release_task", json={"prompt": "p"}, headers=AUTH)
    assert r.status_code == 429 and "ACESTEP_CALLER_MAX_QUEUED" in r.json()["detail"], r.text
    for client in (chat, api):  # the chat on either listener
        r = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        assert r.status_code == 429 and r.headers["Retry-After"] == "30", r.text
        assert "ACESTEP_CALLER_MAX_QUEUED" in r.json()["detail"] and "X-Task-ID" not in r.headers
    assert backend.queue.size() == 1


@pytest.mark.parametrize("first", ["chat", "api"])
def test_the_request_rate_is_per_caller_and_shared_by_both_apis(settings, first):
    api, chat, _ = _apps(settings, rate_limit_rps=0.5)  # a burst of one request, then one per 2 s
    bad = {"messages": "not a list"}  # 400, but a POST counts like any other
    if first == "chat":
        assert chat.post("/v1/chat/completions", json=bad, headers=AUTH).status_code == 400
    else:
        assert api.post("/release_task", json={"prompt": "p", "audio_duration": 1}, headers=AUTH).status_code == 400
    for client, path in ((chat, "/v1/chat/completions"), (api, "/release_task"), (api, "/v1/chat/completions")):
        r = client.post(path, json=bad, headers=AUTH)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "ACESTEP_RATE_LIMIT_RPS" in r.json()["detail"]
    assert chat.get("/v1/models", headers=AUTH).status_code == 200  # reads are not counted
    other = {"Authorization": "Bearer someone-else"}  # another caller has its own bucket (then fails auth)
    assert chat.post("/v1/chat/completions", json=bad, headers=other).status_code == 401


def test_a_chat_app_mounted_in_the_api_counts_each_request_once(settings):
    settings = settings.model_copy(update={"api_key": KEY, "rate_limit_rps": 0.5})
    backend = make_embedded_backend(settings)
    api = create_app(settings, backend)
    api.mount("/openrouter", build_openrouter_app(settings, api))  # as entrypoints/lambda_api.py does
    client = TestClient(api)
    bad = {"messages": "not a list"}
    assert client.post("/openrouter/v1/chat/completions", json=bad, headers=AUTH).status_code == 400
    assert client.post("/openrouter/v1/chat/completions", json=bad, headers=AUTH).status_code == 429


def test_a_waiting_chat_does_not_hold_its_body_or_audio(settings):
    """A chat waits up to ACESTEP_GENERATION_TIMEOUT for its task: the body, its parsed copy and the decoded
    audio (~3x the body) must be released once submitted, or clients waiting at once add up (measured live:
    8 waiting chats with 60 MB of audio each held 1.4 GB; each held 2.8x its body before the fix)."""
    import base64
    import json
    import threading
    import tracemalloc

    api, chat, backend = _apps(settings, openrouter_max_wait=0.6)
    audio = base64.b64encode(bytes(range(256)) * 12 * 1024).decode()  # 3 MB of audio, 4 MB of base64
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "<prompt>piano</prompt>"},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}]}).encode()
    del audio
    samples: list[int] = []
    answered = threading.Event()

    budget, counted = api.app.state.body_budget, []  # handlers/body_budget.py: given back too

    def sample_while_waiting() -> None:  # the least held once the task exists (robust to a slow machine)
        while not answered.is_set():
            if backend.queue.size():
                samples.append(tracemalloc.get_traced_memory()[0] - base)
                counted.append(budget.held)
            answered.wait(0.05)

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sampler = threading.Thread(target=sample_while_waiting)
        sampler.start()
        r = chat.post("/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
        answered.set()
        sampler.join()
    finally:
        tracemalloc.stop()
    assert r.status_code == 504, r.text  # no worker: it waited the whole limit
    assert samples and min(samples) < len(body) // 4, (min(samples or [0]), len(body))
    assert min(counted) == 0


def test_a_chat_answer_with_big_audio_is_written_without_building_it_in_memory(settings):
    """8 songs of 600 s wav32 are 1.8 GB (2.5 GB as base64) at 48 kHz stereo: the answer built whole held
    three copies of that for one request. Now its base64 is written piece by piece, one file read at a time."""
    import asyncio
    import json
    import tracemalloc

    from tests.support_engine import SineEngine
    from service.worker import Worker

    api, chat, backend = _apps(settings, openrouter_max_wait=30)
    worker = Worker(chat.app.state.settings, backend, SineEngine(), worker_id="w")
    body = json.dumps({"messages": [{"role": "user", "content": "<prompt>x</prompt>"}], "batch_size": 8,
                       "audio_config": {"duration": 30, "format": "wav32"}}).encode()  # 8 x 1.9 MB (16 kHz mono)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"authorization", AUTH["Authorization"].encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8002)}
    sent: list[bytes] = []  # the pieces' sizes are kept, not the pieces
    sizes: list[int] = []

    async def call() -> None:
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if delivered:  # the client stays connected until the answer is written
                await asyncio.sleep(3600)
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sizes.append(len(message.get("body", b"")))
                if not sent:
                    sent.append(message.get("body", b"")[:200])

        def work() -> None:  # then only what the answer takes is measured (the engine's own work is not)
            worker.run_once(5.0)
            tracemalloc.reset_peak()
            base.append(tracemalloc.get_traced_memory()[0])

        run = asyncio.get_running_loop().run_in_executor(None, work)
        await chat.app(scope, receive, send)
        await run

    base: list[int] = []
    tracemalloc.start()
    try:
        asyncio.run(call())
        peak = tracemalloc.get_traced_memory()[1] - base[0]
    finally:
        tracemalloc.stop()
    total = sum(sizes)
    assert sent[0].startswith(b'{"id":') and total > 8 * 30 * 16000 * 4 * 4 / 3, total  # 8 files, base64
    assert peak < total / 2, (peak, total)
