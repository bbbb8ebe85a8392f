"""The submit use case (service/submitter.py): its view of the fleet, its refusals and how HTTP shows them,
and the one caller per request that the rate limit and the caller limits count."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

import pytest

from engine.request import GenerationRequest
from handlers.caller import caller_from_scope
from handlers.envelope import refusal_response
from service.caller_limits import Caller
from service.config import Settings
from service.embedded import make_embedded_backend
from service.fleet import Fleet
from service.records import MODELS_META_KEY, ModelsMeta, WorkerHeartbeat
from service.refusals import LMNotReported, LMNotServed, NoWorker, QueueFull, StorageFull
from service.submitter import LM_NOT_SERVED, SubmitTask, Submitter

ANYONE = Caller.at("203.0.113.9")


def beat(worker_id: str, **fields) -> WorkerHeartbeat:
    now = time.time()
    return WorkerHeartbeat(worker_id=worker_id, started_at=now, beat_at=now, **fields)


@pytest.fixture
def backend(tmp_path):
    return make_embedded_backend(Settings(data_dir=str(tmp_path)))


def counted(store, name: str, key: Optional[str] = None) -> list[int]:
    """Count the calls of store.<name> (what the fleet reads), with `key` only those for that key."""
    reads, original = [0], getattr(store, name)

    def wrapper(*args):
        reads[0] += key is None or args[:1] == (key,)
        return original(*args)

    setattr(store, name, wrapper)
    return reads


def test_a_healthy_worker_is_remembered_a_refusal_is_not(backend):
    fleet = Fleet(backend, accept_seconds=3600)
    reads = counted(backend.store, "heartbeats")
    assert fleet.unservable_reason() is None  # no worker yet: accepted but not remembered
    backend.store.record_heartbeat(beat("gpu-1", state="failed", error="no weights"))
    assert "gpu-1: no weights" in (fleet.unservable_reason() or "")  # seen at once
    assert "gpu-1: no weights" in (fleet.unservable_reason() or "")  # and again: refusals are re-read
    backend.store.record_heartbeat(beat("gpu-2"))
    assert fleet.unservable_reason() is None
    seen = reads[0]
    assert fleet.unservable_reason() is None and reads[0] == seen  # remembered: no read


def test_an_lm_reported_by_a_worker_is_remembered_none_reported_is_not(backend):
    fleet = Fleet(backend, accept_seconds=3600)
    assert fleet.runs_lm() is None  # nobody reported: unknown, and looked up again next time
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="none").model_dump())
    assert fleet.runs_lm() is False
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="acestep-5Hz-lm-1.7B").model_dump())
    assert fleet.runs_lm() is True
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="none").model_dump())
    assert fleet.runs_lm() is True  # remembered for accept_seconds


def test_the_workers_heartbeats_say_whether_the_lm_is_served(backend):
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="acestep-5Hz-lm-1.7B").model_dump())
    backend.store.record_heartbeat(beat("older", lm_model=None))  # says nothing: the meta answers
    assert Fleet(backend).runs_lm() is True
    backend.store.record_heartbeat(beat("gpu-1", lm_model="none"))  # a live worker's word beats the meta
    assert Fleet(backend).runs_lm() is False
    backend.store.record_heartbeat(beat("gpu-2", lm_model="acestep-5Hz-lm-0.6B"))
    assert Fleet(backend).runs_lm() is True  # one live worker serves it
    gone = time.time() - 3600
    for worker_id, lm in (("gpu-1", "none"), ("gpu-2", "acestep-5Hz-lm-0.6B")):  # scaled to zero
        backend.store.record_heartbeat(WorkerHeartbeat(worker_id=worker_id, started_at=gone, beat_at=gone + 1
                                                       if lm == "none" else gone, lm_model=lm))
    assert Fleet(backend).runs_lm() is False  # what the newest beat said


def submit(submitter: Submitter, command: SubmitTask):
    return submitter.submit_blocking(command)


def test_the_lm_is_asked_about_once_per_submit_and_its_refusal_is_one_answer(backend):
    submitter = Submitter(Settings(data_dir="unused"), backend)
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="none").model_dump())
    reads = counted(backend.store, "get_meta", MODELS_META_KEY)  # (a submit also reads the default adapters)
    with pytest.raises(LMNotServed) as refused:
        submit(submitter, SubmitTask(GenerationRequest(sample_query="a song"), ANYONE))
    assert reads[0] == 1 and refused.value.detail == LM_NOT_SERVED and refused.value.status == 400
    # A caller that needs the answer now is refused by the same question, as a 503.
    with pytest.raises(LMNotReported) as waiting:
        submit(submitter, SubmitTask(GenerationRequest(use_format=True), ANYONE, answer_now=True))
    assert reads[0] == 2 and waiting.value.status == 503 and waiting.value.retry_after is None
    # A request that needs no LM does not ask.
    assert submit(submitter, SubmitTask(GenerationRequest(audio_duration=10), ANYONE)).task_id
    assert reads[0] == 2


def test_without_an_lm_a_guessed_query_becomes_the_caption(backend):
    submitter = Submitter(Settings(data_dir="unused"), backend)
    command = SubmitTask(GenerationRequest(sample_query="sad piano", sample_mode=True), ANYONE,
                         query_as_caption_without_lm=True)
    assert not submit(submitter, command).query_as_caption  # nobody reported: the worker decides
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="none").model_dump())
    task = submit(submitter, command)
    stored = backend.store.get(task.task_id).request
    assert task.query_as_caption and stored.prompt == "sad piano" and stored.sample_query == ""
    assert not stored.sample_mode


def test_refusals_carry_their_status_and_retry_after_and_map_to_http_once(backend):
    settings = Settings(data_dir="unused", queue_maxsize=1)
    submitter = Submitter(settings, backend)
    backend.store.record_heartbeat(beat("gpu-1", state="failed", error="no weights"))
    with pytest.raises(NoWorker) as no_worker:
        submit(submitter, SubmitTask(GenerationRequest(), ANYONE))
    backend.store.record_heartbeat(beat("gpu-1"))
    submit(submitter, SubmitTask(GenerationRequest(), ANYONE))
    with pytest.raises(QueueFull) as full:
        submit(submitter, SubmitTask(GenerationRequest(), ANYONE))
    backend.has_room = lambda: False
    with pytest.raises(StorageFull) as storage:
        submit(submitter, SubmitTask(GenerationRequest(), ANYONE))
    for refusal, status, retry_after, detail in (
            (no_worker.value, 503, "60", "no worker can run tasks: gpu-1: no weights"),
            (full.value, 429, "5", "Server busy: queue is full"),
            (storage.value, 507, "60", "the server's storage is full; try again later")):
        response = refusal_response(refusal)
        assert (response.status_code, response.headers["Retry-After"]) == (status, retry_after)
        assert json.loads(response.body) == {"detail": detail}


def test_one_caller_object_per_request_for_the_rate_limit_and_the_task_limits():
    scope = {"type": "http", "headers": [], "client": ("198.51.100.7", 5000)}
    first = caller_from_scope(scope)  # the rate limiter asks first
    assert caller_from_scope(scope) is first and first == Caller.at("198.51.100.7")  # the route gets that one
    assert first.id == "ip:198.51.100.7"


def test_submit_vets_the_webhook_before_anything_is_stored(backend):
    from service.refusals import WebhookRejected

    submitter = Submitter(Settings(data_dir="unused"), backend)
    with pytest.raises(WebhookRejected) as refused:
        asyncio.run(submitter.submit(SubmitTask(GenerationRequest(), ANYONE, webhook_url="http://127.0.0.1/x")))
    assert refused.value.status == 400 and backend.queue.size() == 0


def test_the_stored_request_names_the_model_it_runs_on(backend):
    settings = Settings(data_dir="unused", config_path="acestep-v15-turbo", config_path2="acestep-v15-base")
    submitter = Submitter(settings, backend)
    unnamed = submit(submitter, SubmitTask(GenerationRequest(audio_duration=10), ANYONE))
    named = submit(submitter, SubmitTask(GenerationRequest(audio_duration=10, model="acestep-v15-base"), ANYONE))
    assert backend.store.get(unnamed.task_id).request.model == "acestep-v15-turbo"  # this server's default
    assert backend.store.get(named.task_id).request.model == "acestep-v15-base"
    bare = Submitter(Settings(data_dir="unused", config_path=""), backend)  # none configured: the worker decides
    assert backend.store.get(submit(bare, SubmitTask(GenerationRequest(), ANYONE)).task_id).request.model is None


def test_the_cost_check_sees_the_source_keys_the_task_is_stored_with(backend, monkeypatch):
    """One function decides each source's key (service.submission.place_sources): a sent file and a direct
    upload both become the task's own keys, and the cost check reads those, not a placeholder."""
    import service.submitter as submitter_module
    from engine.request import DECLARED_SOURCES
    from service.blob_keys import new_pending_upload_key
    from service.sources import SentFile, UploadKey
    from service.submission import Upload

    seen = []
    real_check = submitter_module.check_task
    monkeypatch.setattr(submitter_module, "check_task", lambda request, max_cost: (seen.append(request),
                                                                                   real_check(request, max_cost)))
    pending = new_pending_upload_key("ref.wav")  # POST /v1/uploads, then the PUT
    backend.blobs.put(pending, b"RIFF", "audio/wav")
    sources = (SentFile("src_audio", Upload(b"RIFF", "song.flac", "audio/flac"), "src_audio"),
               UploadKey("reference_audio", pending, "reference_audio_key"))
    request = GenerationRequest.model_validate({"task_type": "cover", "audio_duration": 10},
                                               context={DECLARED_SOURCES: ("src_audio", "reference_audio")})
    task = submit(Submitter(Settings(data_dir="unused"), backend), SubmitTask(request, ANYONE, sources=sources))
    stored = backend.store.get(task.task_id).request
    assert (stored.src_audio_key, stored.reference_audio_key) == (
        f"uploads/{task.task_id}/src_audio.flac", f"uploads/{task.task_id}/reference_audio.wav")
    assert [(r.src_audio_key, r.reference_audio_key) for r in seen] == [
        (stored.src_audio_key, stored.reference_audio_key)]
    assert backend.blobs.get(stored.src_audio_key) == backend.blobs.get(stored.reference_audio_key) == b"RIFF"
