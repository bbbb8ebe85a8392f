"""The port contract, run against every backend (embedded SQLite/files and AWS through moto)."""
from __future__ import annotations

import time

import pytest

from service.ports import FAILED, QUEUED, RUNNING, SUCCEEDED, QueueFull, TaskRecord
from service.records import AudioFile, TaskResult
from service.submission import Upload, submit_task
from engine.request import GenerationRequest
from service.records import FailureReason, StoredRequestInvalid
from tests.store_support import corrupt_request


def _new(backend, task_id, **request):
    backend.store.create(TaskRecord(task_id=task_id, request=GenerationRequest(**(request or {"prompt": task_id}))))


# -- task store ---------------------------------------------------------------------------

def test_create_get_roundtrip(backend):
    _new(backend, "t1", prompt="jazz", batch_size=2)
    rec = backend.store.get("t1")
    assert rec.task_id == "t1" and rec.status == QUEUED and rec.request == GenerationRequest(prompt="jazz", batch_size=2)
    assert backend.store.get("missing") is None
    assert set(backend.store.get_many(["t1", "missing", "t1"])) == {"t1"}


def test_claim_bumps_attempt_and_finish_happens_once(backend):
    _new(backend, "t1")
    a1 = backend.store.claim("t1", "w1").attempt
    assert a1 == 1 and backend.store.get("t1").status == RUNNING
    a2 = backend.store.claim("t1", "w2").attempt  # redelivery to another worker
    assert a2 == 2
    # the first (stale) attempt is fenced out of progress and finish
    assert backend.store.update_progress("t1", a1, 0.5, "dit") is False
    assert backend.store.finish("t1", a1, result=TaskResult()) is False
    assert backend.store.update_progress("t1", a2, 0.5, "dit") is True
    assert backend.store.get("t1").progress == pytest.approx(0.5)
    won = TaskResult(audios=[AudioFile(key="outputs/t1/2-0.mp3", format="mp3", seed=3)], metas={"bpm": 90},
                     generation_info={"random_weights": True}, dit_model="m")
    assert backend.store.finish("t1", a2, result=won, blob_keys=["outputs/t1/2-0.mp3"]) is True
    # a duplicate finish (even by the winning attempt) cannot overwrite
    assert backend.store.finish("t1", a2, error="late failure") is False
    rec = backend.store.get("t1")
    assert rec.status == SUCCEEDED and rec.result == won and rec.error is None
    assert "outputs/t1/2-0.mp3" in rec.blob_keys
    assert backend.store.claim("t1", "w3") is None  # finished tasks are not claimed again


def test_failed_task_keeps_reason(backend):
    _new(backend, "t1")
    a = backend.store.claim("t1", "w").attempt
    assert backend.store.finish("t1", a, error="could not decode src_audio: not audio")
    rec = backend.store.get("t1")
    assert rec.status == FAILED and rec.error == "could not decode src_audio: not audio"


def test_fail_unfinished_only_touches_unfinished(backend):
    _new(backend, "q")
    _new(backend, "done")
    a = backend.store.claim("done", "w").attempt
    backend.store.finish("done", a, result=TaskResult())
    assert backend.store.fail_unfinished("q", "dead-lettered", FailureReason.DEAD_LETTERED) is True
    assert backend.store.fail_unfinished("done", "dead-lettered", FailureReason.DEAD_LETTERED) is False
    assert backend.store.get("q").error == "dead-lettered"
    assert backend.store.get("q").reason is FailureReason.DEAD_LETTERED
    assert backend.store.get("done").status == SUCCEEDED and backend.store.get("done").reason is None


def test_failure_reasons_are_stored(backend):
    _new(backend, "f")
    _new(backend, "c")
    backend.store.finish("f", backend.store.claim("f", "w").attempt, error="no", reason=FailureReason.COST_REFUSED)
    backend.store.cancel("c", "cancelled by the client")
    assert backend.store.get("f").reason is FailureReason.COST_REFUSED
    assert backend.store.get("c").reason is FailureReason.CANCELLED


def test_a_stored_request_that_no_longer_parses_is_refused_by_the_claim_only(backend):
    _new(backend, "old", prompt="kept")
    corrupt_request(backend, "old", '{"prompt": "kept", "batch_size": 99, "retired_field": 1}')
    with pytest.raises(StoredRequestInvalid, match="batch_size"):
        backend.store.claim("old", "w")
    rec = backend.store.get("old")  # still shown (and swept) as stored, and not claimed
    assert rec.status == QUEUED and rec.attempt == 0 and rec.request.prompt == "kept"


def test_counts_positions_and_durations(backend):
    for i in range(4):
        _new(backend, f"t{i}")
    assert backend.store.queue_positions([f"t{i}" for i in range(4)] + ["missing"]) == {"t0": 1, "t1": 2, "t2": 3, "t3": 4}
    a = backend.store.claim("t0", "w").attempt
    assert backend.store.queue_positions(["t0", "t3", "t2", "t1"]) == {"t1": 1, "t2": 2, "t3": 3}
    assert backend.store.queue_positions([]) == {}
    time.sleep(0.01)
    backend.store.finish("t0", a, result=TaskResult())
    b = backend.store.claim("t1", "w").attempt
    backend.store.finish("t1", b, error="x")
    counts = backend.store.counts()
    assert counts == {"queued": 2, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0, "total": 4}
    recent = backend.store.recent_finished(10)
    assert [r.task_id for r in recent] == ["t1", "t0"]  # newest first
    assert recent[0].status == FAILED and recent[0].finished_at >= recent[0].started_at
    assert [r.task_id for r in backend.store.recent_finished(1)] == ["t1"]


def test_heartbeats_one_entry_per_worker(backend):
    from service.records import WorkerHeartbeat

    assert backend.store.heartbeats() == []
    now = time.time()
    backend.store.record_heartbeat(WorkerHeartbeat(worker_id="w1", started_at=now, beat_at=now))
    backend.store.record_heartbeat(WorkerHeartbeat(worker_id="w2", started_at=now, beat_at=now))
    later = WorkerHeartbeat(worker_id="w1", started_at=now, beat_at=now + 1, state="running", task_ids=["t"],
                            last_progress_at=now + 0.5)
    backend.store.record_heartbeat(later)
    assert backend.store.heartbeats() == [later, WorkerHeartbeat(worker_id="w2", started_at=now, beat_at=now)]
    backend.store.record_heartbeat(WorkerHeartbeat(worker_id="old", started_at=0, beat_at=now - 2 * 86400))
    backend.store.forget_heartbeat("w2")
    backend.store.forget_heartbeat("never-seen")
    assert [b.worker_id for b in backend.store.heartbeats()] == ["w1"]  # "old" is past the retention


def test_meta_roundtrip(backend):
    assert backend.store.get_meta("models") is None
    backend.store.put_meta("models", {"models": [{"name": "m", "random_weights": True}]})
    backend.store.put_meta("models", {"models": [{"name": "n", "random_weights": False}]})
    assert backend.store.get_meta("models") == {"models": [{"name": "n", "random_weights": False}]}


def test_delete_and_blob_keys(backend):
    backend.store.create(TaskRecord(task_id="t1", request=GenerationRequest(), blob_keys=["uploads/t1/src_audio.wav"]))
    assert backend.store.get("t1").blob_keys == ["uploads/t1/src_audio.wav"]
    backend.store.delete("t1")
    assert backend.store.get("t1") is None


# -- queue --------------------------------------------------------------------------------

def test_queue_fifo_lease_ack(backend):
    for t in ("a", "b"):
        backend.queue.enqueue(t, 10)
    first = backend.queue.receive(1, 30)
    second = backend.queue.receive(1, 30)
    assert [first.task_id, second.task_id] == ["a", "b"]
    assert first.receive_count == 1
    assert backend.queue.receive(0, 30) is None  # both leased
    backend.queue.ack(first)
    backend.queue.ack(second)
    assert backend.queue.receive(0, 30) is None
    assert backend.queue.size() == 0


def test_queue_redelivers_after_visibility_timeout(backend):
    backend.queue.enqueue("a", 10)
    lease = backend.queue.receive(1, 1)
    assert lease is not None
    assert backend.queue.receive(0, 1) is None
    again = backend.queue.receive(3, 30)  # the un-acked lease expires and comes back
    assert again is not None and again.task_id == "a" and again.receive_count == 2


def test_queue_extend_keeps_lease_hidden(backend):
    backend.queue.enqueue("a", 10)
    lease = backend.queue.receive(1, 1)
    backend.queue.extend(lease, 30)
    assert backend.queue.receive(1.5, 30) is None


def test_queue_release_makes_task_visible_now(backend):
    backend.queue.enqueue("a", 10)
    lease = backend.queue.receive(1, 60)
    backend.queue.release(lease)
    again = backend.queue.receive(1, 60)
    assert again is not None and again.task_id == "a"


def test_queue_full_raises(backend):
    backend.queue.enqueue("a", 2)
    backend.queue.enqueue("b", 2)
    with pytest.raises(QueueFull):
        backend.queue.enqueue("c", 2)
    assert backend.queue.size() == 2


# -- blobs --------------------------------------------------------------------------------

def test_blobs_roundtrip(backend):
    backend.blobs.put("outputs/t/1-0.wav", b"RIFF....", "audio/wav")
    assert backend.blobs.size("outputs/t/1-0.wav") is not None
    assert backend.blobs.get("outputs/t/1-0.wav") == b"RIFF...."
    backend.blobs.delete("outputs/t/1-0.wav")
    assert backend.blobs.size("outputs/t/1-0.wav") is None
    with pytest.raises(KeyError):
        backend.blobs.get("outputs/t/1-0.wav")


# -- submission ---------------------------------------------------------------------------

def test_submit_is_all_or_nothing_when_queue_full(backend):
    submit_task(backend, GenerationRequest(prompt="a"), max_queue=1)
    with pytest.raises(QueueFull):
        submit_task(backend, GenerationRequest(prompt="b"), max_queue=1,
                    uploads={"src_audio": Upload(b"abc", "in.wav", "audio/wav")}, task_id="t-full")
    assert backend.store.get("t-full") is None
    assert backend.blobs.size("uploads/t-full/src_audio.wav") is None
    assert backend.store.counts()["total"] == 1


def test_submit_stores_uploads_as_task_blobs(backend):
    task_id, pos = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5,
                               uploads={"src_audio": Upload(b"abc", "in.WAV", "audio/wav")})
    rec = backend.store.get(task_id)
    assert pos == 1
    assert rec.request.src_audio_key == f"uploads/{task_id}/src_audio.wav"
    assert rec.blob_keys == [f"uploads/{task_id}/src_audio.wav"]
    assert backend.blobs.get(rec.request.src_audio_key) == b"abc"


def test_blob_size(backend):
    assert backend.blobs.size("uploads/pending/x/a.wav") is None
    backend.blobs.put("uploads/pending/x/a.wav", b"12345", "audio/wav")
    assert backend.blobs.size("uploads/pending/x/a.wav") == 5


def test_submit_is_atomic_and_leaves_nothing_when_queue_full(backend):
    """Task row and queue entry go together: a full queue leaves neither (and no orphan upload)."""
    submit_task(backend, GenerationRequest(prompt="a"), max_queue=1)
    with pytest.raises(QueueFull):
        submit_task(backend, GenerationRequest(prompt="b"), max_queue=1, idempotency_key="k-full",
                    uploads={"src_audio": Upload(b"abc", "in.wav", "audio/wav")}, task_id="t-full2")
    assert backend.store.get("t-full2") is None
    assert backend.store.find_by_idempotency_key("k-full") is None
    assert backend.queue.size() == 1
    # the key is free again: the retry after the 429 goes through once there is room
    lease = backend.queue.receive(0, 30)  # a worker takes the waiting task
    backend.store.claim(lease.task_id, "worker")
    backend.queue.ack(lease)
    task_id, _ = submit_task(backend, GenerationRequest(prompt="b"), max_queue=1, idempotency_key="k-full",
                             uploads={"src_audio": Upload(b"abc", "in.wav", "audio/wav")})
    assert backend.store.get(task_id) is not None


def test_retried_submit_with_same_idempotency_key_returns_first_task(backend):
    up = {"src_audio": Upload(b"abc", "in.wav", "audio/wav")}
    first, pos = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, uploads=up, idempotency_key="retry-1")
    again, pos2 = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, uploads=up, idempotency_key="retry-1")
    assert again == first and pos2 == pos == 1
    assert backend.store.counts()["total"] == 1 and backend.queue.size() == 1
    other, _ = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, uploads=up, idempotency_key="retry-2")
    assert other != first and backend.queue.size() == 2


def test_idempotency_key_reused_for_a_different_request_is_refused(backend):
    from service.ports import IdempotencyConflict

    first, _ = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, idempotency_key="k")
    with pytest.raises(IdempotencyConflict, match=first):
        submit_task(backend, GenerationRequest(prompt="something else"), max_queue=5, idempotency_key="k")
    with pytest.raises(IdempotencyConflict):  # same fields, different uploaded audio
        submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, idempotency_key="k",
                    uploads={"src_audio": Upload(b"xyz", "in.wav", "audio/wav")})
    assert backend.store.counts()["total"] == 1


def test_concurrent_retries_create_one_task(backend):
    """The intake itself holds the key: two submits that both missed the pre-check still make one task."""
    from service.idempotency import request_digest

    records = [TaskRecord(task_id=f"race-{i}", request=GenerationRequest(prompt="a"), idempotency_key="race",
                          request_digest=request_digest({"prompt": "a"})) for i in range(2)]
    (t1, created1), (t2, created2) = [backend.intake.submit(r, 5) for r in records]
    assert (created1, created2) == (True, False) and t1.task_id == t2.task_id == "race-0"
    assert backend.store.get("race-1") is None and backend.queue.size() == 1


def test_cancel_ends_queued_and_running_tasks_only(backend):
    from service.records import CANCELLED

    _new(backend, "q")
    backend.queue.enqueue("q", 10)
    _new(backend, "r")
    a = backend.store.claim("r", "w").attempt
    _new(backend, "done")
    d = backend.store.claim("done", "w").attempt
    backend.store.finish("done", d, result=TaskResult())
    assert backend.store.cancel("q", "cancelled by the client") is True
    assert backend.store.cancel("r", "cancelled by the client") is True
    assert backend.store.cancel("done", "x") is False and backend.store.cancel("missing", "x") is False
    assert backend.store.cancel("q", "again") is False  # once
    for task_id in ("q", "r"):
        rec = backend.store.get(task_id)
        assert rec.status == CANCELLED and rec.error == "cancelled by the client" and rec.finished_at
    # the running attempt is fenced out: its progress and its result are refused
    assert backend.store.update_progress("r", a, 0.5, "dit") is False
    assert backend.store.finish("r", a, result=TaskResult()) is False
    assert backend.store.claim("q", "w2") is None  # a cancelled task never runs
    assert backend.store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 2,
                                      "total": 3}


# -- the webhook outbox -------------------------------------------------------------------

def _hooked(backend, task_id, url="https://hooks.example.com/h"):
    backend.store.create(TaskRecord(task_id=task_id, request=GenerationRequest(prompt=task_id), webhook_url=url))


def test_ending_a_task_puts_its_webhook_in_the_outbox_in_the_same_write(backend):
    _hooked(backend, "ok")
    _hooked(backend, "dead")
    _hooked(backend, "gone")
    _hooked(backend, "waiting")
    _new(backend, "quiet")  # no webhook_url: never in the outbox
    backend.store.finish("ok", backend.store.claim("ok", "w").attempt, result=TaskResult())
    backend.store.fail_unfinished("dead", "dead-lettered", FailureReason.DEAD_LETTERED)
    backend.store.cancel("gone", "cancelled by the client")
    backend.store.finish("quiet", backend.store.claim("quiet", "w").attempt, result=TaskResult())
    due = backend.store.webhooks_due(time.time() + 1, 10)
    assert sorted(d.task_id for d in due) == ["dead", "gone", "ok"]  # "waiting" has not ended
    assert all(d.url == "https://hooks.example.com/h" and d.attempts == 0 for d in due)
    assert [d.due_at for d in due] == sorted(d.due_at for d in due)  # earliest first
    assert len(backend.store.webhooks_due(time.time() + 1, 2)) == 2
    assert backend.store.webhooks_due(min(d.due_at for d in due) - 1, 10) == []  # nothing due yet back then


def test_a_webhook_is_claimed_by_one_process_and_retried_or_settled(backend):
    _hooked(backend, "t")
    backend.store.cancel("t", "x")
    (due,) = backend.store.webhooks_due(time.time() + 1, 10)
    now = time.time()
    assert backend.store.claim_webhook(due, now + 30) is True
    assert backend.store.claim_webhook(due, now + 31) is False  # a second process read the same entry: too late
    assert backend.store.webhooks_due(now + 29, 10) == []  # hidden while the attempt's lease runs
    (leased,) = backend.store.webhooks_due(now + 30, 10)  # the lease ran out (its process died): due again
    assert leased.attempts == 1 and leased.due_at == now + 30
    assert backend.store.settle_webhook("t", now + 999, None) is False  # not the claim that holds it
    assert backend.store.settle_webhook("t", now + 30, now + 60) is True  # failed: retry later
    assert backend.store.webhooks_due(now + 59, 10) == []
    (retry,) = backend.store.webhooks_due(now + 60, 10)
    assert backend.store.claim_webhook(retry, now + 90) and backend.store.settle_webhook("t", now + 90, None)
    assert backend.store.webhooks_due(now + 10 ** 6, 10) == []  # delivered: out of the outbox
    assert backend.store.get("t").status == "cancelled"  # the task itself is untouched


def test_idempotency_keys_are_each_callers_own(backend):
    """Issue 21.13: the same key from another caller found the first caller's task (a 422 naming its id,
    or its task returned outright); each caller's keys now name only its own tasks."""
    from service.ports import IdempotencyConflict

    mine, _ = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, idempotency_key="k", owner="key:me")
    theirs, _ = submit_task(backend, GenerationRequest(prompt="b"), max_queue=5, idempotency_key="k", owner="ip:other")
    same, _ = submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, idempotency_key="k", owner="ip:third")
    assert len({mine, theirs, same}) == 3 and backend.store.counts()["total"] == 3
    assert submit_task(backend, GenerationRequest(prompt="a"), max_queue=5, idempotency_key="k", owner="key:me")[0] == mine
    with pytest.raises(IdempotencyConflict, match="Idempotency-Key 'k' was already used for task " + theirs):
        submit_task(backend, GenerationRequest(prompt="c"), max_queue=5, idempotency_key="k", owner="ip:other")


def test_a_task_keeps_its_own_copy_of_a_direct_upload(backend):
    """Issue 21.16: a direct upload expires on its own clock (the embedded sweep, S3's lifecycle rule on
    uploads/), also while a task that shares it still waits; each task now holds its own copy."""
    pending = "uploads/pending/0123456789abcdef0123456789abcdef/song.wav"
    backend.blobs.put(pending, b"RIFFshared", "audio/wav")
    first, _ = submit_task(backend, GenerationRequest(task_type="cover", src_audio_key=pending), max_queue=5)
    second, _ = submit_task(backend, GenerationRequest(task_type="cover", src_audio_key=pending), max_queue=5)
    backend.blobs.delete(pending)  # expired
    for task_id in (first, second):
        record = backend.store.get(task_id)
        assert record.request.src_audio_key == f"uploads/{task_id}/src_audio.wav" == record.blob_keys[0]
        assert backend.blobs.get(record.request.src_audio_key) == b"RIFFshared"
    backend.blobs.delete(backend.store.get(first).request.src_audio_key)  # the first task's files go with it
    assert backend.blobs.get(backend.store.get(second).request.src_audio_key) == b"RIFFshared"
