"""/format_input waits for its worker on the event loop, counts against the caller's limits, and cancels
what it stops waiting for (issue 21 item 3, issue 23 item 3).

A burst larger than the thread pool must leave /health and other callers' submits answering while it
waits: the tests give the app 4 threads (anyio's default limiter) and send 60 calls, and assert the order
of events (the others answer while every format call still waits), never a wall-clock threshold.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import anyio.to_thread
import httpx

from engine.request import GenerationRequest
from engine.types import GenerationResult, Metas, ProgressCallback
from service.records import CANCELLED, MODELS_META_KEY, QUEUED, ModelsMeta
from tests.api_support import make_api
from tests.support_engine import SineEngine

THREADS = 4
BURST = 60
CALLER_MAX_QUEUED = 50


class FormattingEngine(SineEngine):
    """The sine test engine plus a stand-in for the LM's format mode: caption upper-cased, fixed metadata,
    labelled as a test engine. Only analysis tasks are answered this way."""
    lm_loaded = True

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None, progress: Optional[ProgressCallback] = None,
                 encode: bool = True) -> GenerationResult:
        if not request.analysis_only:
            return super().generate(request, src_audio=src_audio, reference_audio=reference_audio,
                                    progress=progress, encode=encode)
        self.calls.append({"request": request, "src_audio": None, "reference_audio": None})
        return GenerationResult(
            audios=[], metas=Metas(bpm=96, duration=30, key_scale="A minor", time_signature="4"),
            dit_model=self.model_names[0], lm_model="test-engine",
            generation_info={"caption": request.prompt.upper(), "lyrics": request.lyrics, "test_engine": True,
                             "random_weights": True, "lm_metadata": {"language": "en"}})


def _api(settings, **overrides):
    # The request rate is its own limit (tests/test_openrouter_limits.py): off here, so tasks are what counts.
    api = make_api(settings, caller_max_queued=CALLER_MAX_QUEUED, rate_limit_rps=0.0, **overrides)
    api.engine = FormattingEngine(settings.model_names)
    api.__post_init__()  # the worker with this engine
    api.backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="test-lm").model_dump())  # "I run an LM"
    return api


def _client(api, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=api.client.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://api", timeout=None)


async def _until(condition, what: str, limit: float = 120.0) -> None:
    """Wait for `condition()` (a failsafe limit, never reached when the API behaves)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_format_burst_beyond_the_thread_pool_leaves_the_api_answering(settings):
    api = _api(settings, format_timeout=300.0)  # nothing times out here: the worker answers in the end

    async def scenario():
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        async with _client(api, "10.0.0.1") as burst, _client(api, "10.0.0.2") as other:
            calls = [asyncio.create_task(burst.post("/format_input", json={"prompt": f"song {i}", "lyrics": "la"}))
                     for i in range(BURST)]
            refused = lambda: [c for c in calls if c.done() and c.result().status_code == 429]  # noqa: E731
            queued = lambda: api.backend.store.counts().get(QUEUED, 0)  # noqa: E731
            await _until(lambda: len(refused()) == BURST - CALLER_MAX_QUEUED and queued() == CALLER_MAX_QUEUED,
                         "the burst to be queued up to the caller's limit")
            for r in (c.result() for c in refused()):
                assert r.headers["Retry-After"] == "30" and "ACESTEP_CALLER_MAX_QUEUED" in r.json()["detail"]
            waiting = [c for c in calls if not c.done()]
            assert len(waiting) == CALLER_MAX_QUEUED

            # While all 50 wait: /health, another caller's submit and poll all answer.
            assert (await other.get("/health")).status_code == 200
            submitted = await other.post("/release_task", json={"prompt": "p", "audio_duration": 10, "batch_size": 1})
            assert submitted.status_code == 200, submitted.text
            polled = await other.post("/query_result", json={"task_id_list": [submitted.json()["data"]["task_id"]]})
            assert polled.status_code == 200
            assert not any(c.done() for c in waiting), "a format call ended before the worker ran"

            await asyncio.to_thread(api.run_worker, 100)  # the worker answers every format task
            answers = await asyncio.gather(*waiting)
        return answers

    answers = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:2]
    assert sorted(r.json()["data"]["caption"] for r in answers)[:2] == ["SONG 0", "SONG 1"]
    assert {r.json()["data"]["key_scale"] for r in answers} == {"A minor"}
    assert api.backend.store.counts().get(QUEUED, 0) == 0


def test_a_format_task_whose_caller_timed_out_is_cancelled_not_run_later(settings):
    api = _api(settings, format_timeout=0.3)
    r = api.client.post("/format_input", json={"prompt": "x"})  # no worker runs now
    assert r.status_code == 504 and "ACESTEP_FORMAT_TIMEOUT" in r.json()["detail"] and "cancelled" in r.json()["detail"]
    api.run_worker()  # a worker that starts later finds nothing to do
    assert api.engine.calls == [] and api.backend.queue.size() == 0
    assert api.backend.store.counts().get(CANCELLED) == 1


def test_a_format_call_cut_short_cancels_its_task(settings):
    """The request is cancelled (server stopping, the caller's connection handled as gone) mid-wait."""
    api = _api(settings, format_timeout=300.0)

    async def scenario():
        async with _client(api, "10.0.0.3") as client:
            call = asyncio.create_task(client.post("/format_input", json={"prompt": "x"}))
            await _until(lambda: api.backend.store.counts().get(QUEUED, 0) == 1, "the format task")
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)

    asyncio.run(scenario())
    assert api.backend.store.counts().get(CANCELLED) == 1 and api.backend.queue.size() == 0
