"""The worker loop against every backend, with a small scripted engine standing in for the DiT.

The scripted engine (tests/worker_support.py) makes real (sine) audio so results decode; its hooks let
a test block, fail or observe a generation. The real engine runs through this same loop in test_e2e_*.
"""
from __future__ import annotations

import io
import logging
import threading
import time

import pytest
import soundfile as sf

from engine.types import GenerationError, Metas
from service.ports import FAILED, QUEUED, RUNNING, SUCCEEDED
from service.records import FailureReason
from tests.store_support import corrupt_request
from tests.worker_support import BAD_SEED, ScriptedEngine, submit
from service.submission import Upload
from service.worker import Worker


@pytest.fixture
def engine():
    return ScriptedEngine()


def test_task_runs_to_success_with_audio_and_progress(settings, backend, engine):
    task_id = submit(backend, batch_size=2, seeds=[11, 12], bpm=90)
    worker = Worker(settings, backend, engine)
    assert worker.run_once(1.0) is True
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and rec.progress == 1.0
    audios = rec.result.audios
    assert [a.seed for a in audios] == [11, 12]
    assert rec.result.metas == Metas(bpm=90) and rec.result.random_weights is True
    for a in audios:
        assert a.key in rec.blob_keys
        data, sr = sf.read(io.BytesIO(backend.blobs.get(a.key)))
        assert sr == 8000 and data.shape == (80000, 2)
    assert backend.queue.size() == 0 and backend.queue.receive(0, 5) is None


def test_worker_publishes_models(settings, backend, engine):
    Worker(settings, backend, engine).publish_models()
    meta = backend.store.get_meta("models")
    assert meta["models"] == [{"name": "test-model", "is_default": True, "random_weights": True,
                               "task_types": ["text2music", "cover"],
                               "adapter_shape": None}]  # a stand-in engine publishes no geometry for adapters


def test_engine_error_fails_task_with_its_message(settings, backend, engine):
    engine.error = GenerationError("could not decode src_audio: not an audio file")
    task_id = submit(backend)
    Worker(settings, backend, engine).run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and rec.error == "could not decode src_audio: not an audio file"


def test_unexpected_crash_is_reported_without_traceback(settings, backend, engine):
    engine.error = RuntimeError("CUDA error: device-side assert triggered")
    task_id = submit(backend)
    Worker(settings, backend, engine).run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == FAILED
    assert rec.error == "internal error while generating: RuntimeError: CUDA error: device-side assert triggered"


def test_lm_only_features_fail_clearly_without_lm(settings, backend, engine):
    task_id = submit(backend, sample_query="a sad song about rain")
    Worker(settings, backend, engine).run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and "5Hz LM" in rec.error and engine.calls == []


def test_thinking_without_lm_runs_dit_and_the_engine_alone_says_so(settings, backend, engine):
    """The engine notes that no LM ran (test_engine_generation.py::test_notes_for_ignored_fields); the worker
    passes the engine's notes on as they are, without a second one saying the same."""
    task_id = submit(backend, thinking=True)
    Worker(settings, backend, engine).run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED
    assert "notes" not in rec.result.generation_info  # this stand-in engine writes none


def test_uploaded_source_audio_reaches_engine(settings, backend, engine):
    seen = {}
    original = engine.generate

    def spy(request, *, src_audio=None, reference_audio=None, progress=None, **kw):
        seen["src"] = src_audio
        return original(request, src_audio=src_audio, reference_audio=reference_audio, progress=progress, **kw)

    engine.generate = spy
    task_id = submit(backend, task_type="cover", src_audio_key="placeholder",
                      uploads={"src_audio": Upload(b"RIFFdata", "in.wav", "audio/wav")})
    Worker(settings, backend, engine).run_once(1.0)
    assert backend.store.get(task_id).status == SUCCEEDED
    assert seen["src"] == b"RIFFdata"


def test_dead_worker_task_is_redelivered_and_finishes_once(settings, backend, engine):
    settings = settings.model_copy(update={"visibility_timeout": 1.0})
    task_id = submit(backend)
    # Worker A leases and claims the task, then dies before finishing (never acks).
    lease = backend.queue.receive(1.0, settings.visibility_timeout)
    stale_attempt = backend.store.claim(lease.task_id, "dead-worker").attempt
    assert backend.store.get(task_id).status == RUNNING
    # Worker B gets it after the lease lapses and completes it.
    assert Worker(settings, backend, engine).run_once(5.0) is True
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and rec.attempt == stale_attempt + 1
    # If A comes back to life, its result is refused and cannot overwrite B's.
    assert backend.store.finish(task_id, stale_attempt, error="late") is False
    assert backend.store.get(task_id).result == rec.result


def test_duplicate_delivery_produces_one_result(settings, backend, engine):
    task_id = submit(backend)
    Worker(settings, backend, engine).run_once(1.0)
    first = backend.store.get(task_id)
    # The same message delivered again (at-least-once queues do this): nothing changes.
    backend.queue.enqueue(task_id, 10)
    Worker(settings, backend, engine).run_once(1.0)
    again = backend.store.get(task_id)
    assert again.result == first.result and again.attempt == first.attempt
    assert len(engine.calls) == 1


def test_shutdown_releases_running_task_for_another_worker(settings, backend, engine):
    task_id = submit(backend)
    worker_a = Worker(settings, backend, engine)
    engine.before_generate = lambda progress: (worker_a.request_stop(cancel_running=True), progress(0.1, "dit"))
    worker_a.run_once(1.0)
    assert backend.store.get(task_id).status == RUNNING  # not failed: handed back
    engine.before_generate = None
    assert Worker(settings, backend, engine).run_once(2.0) is True
    assert backend.store.get(task_id).status == SUCCEEDED


def test_poison_task_is_dead_lettered_with_reason(settings, backend, engine):
    settings = settings.model_copy(update={"visibility_timeout": 1.0})
    task_id = submit(backend)
    for _ in range(settings.max_receives):  # every delivery's worker dies
        lease = backend.queue.receive(5.0, settings.visibility_timeout)
        assert lease is not None and lease.task_id == task_id
        backend.store.claim(task_id, "doomed").attempt
    worker = Worker(settings, backend, engine)
    deadline = time.monotonic() + 10
    while backend.store.get(task_id).status != FAILED and time.monotonic() < deadline:
        worker.dead_letter_chore.last_run = None  # due on every round here
        worker.run_once(0.5)
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and str(settings.max_receives) in rec.error
    assert engine.calls == []


def test_compatible_waiting_tasks_share_one_engine_call(settings, backend, engine):
    ids = [submit(backend, prompt=f"song {i}", seeds=[i]) for i in range(3)]
    other = submit(backend, prompt="long one", audio_duration=20)
    worker = Worker(settings, backend, engine)
    worker.run_once(1.0)
    assert [len(c) for c in engine.calls] == [3]
    assert all(backend.store.get(t).status == SUCCEEDED for t in ids)
    held = backend.store.get(other)  # received while filling the batch, it did not fit: runs next here
    assert held.status == QUEUED and held.attempt == 0  # not claimed yet: no attempt spent on it
    assert backend.queue.receive(0, 5) is None  # still this worker's lease
    worker.run_once(0)  # carried over, not handed back (a give-back counts as a failed delivery on SQS)
    assert backend.store.get(other).status == SUCCEEDED


def test_idle_worker_starts_new_task_promptly(settings, engine):
    """No fixed sleep between polls: a waiting worker sees a new task at once (embedded)."""
    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    worker = Worker(settings, backend, engine)
    started = {}
    engine.before_generate = lambda progress: started.setdefault("t", time.monotonic())
    thread = threading.Thread(target=worker.run_once, args=(10.0,))
    thread.start()
    time.sleep(0.2)  # the worker is now blocked waiting for work
    submitted = time.monotonic()
    submit(backend)
    thread.join(10)
    # Generous bound (the 50 ms target is measured in bench/wake_latency.py); a 5 s poll would fail it.
    assert started["t"] - submitted < 1.0


def test_stop_during_poll_hands_the_new_task_back(settings, backend, engine):
    task_id = submit(backend)
    worker = Worker(settings, backend, engine)
    worker.request_stop()
    assert worker.run_once(1.0) is False
    assert engine.calls == [] and backend.store.get(task_id).status == QUEUED
    assert Worker(settings, backend, engine).run_once(1.0) is True


def test_giving_a_task_back_does_not_count_toward_dead_lettering(settings):
    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)  # SQS counts every receive; its redrive cannot tell
    task_id = submit(backend)
    for _ in range(settings.max_receives + 2):
        backend.queue.release(backend.queue.receive(1.0, 30))
    lease = backend.queue.receive(1.0, 30)
    assert lease is not None and lease.task_id == task_id
    assert backend.store.get(task_id).status == QUEUED


def test_oversized_upload_fails_the_task_before_reading_it(settings, backend, engine):
    settings = settings.model_copy(update={"max_upload_mb": 1})
    task_id = submit(backend, task_type="cover", src_audio_key="placeholder",
                      uploads={"src_audio": Upload(b"x" * (2 * 1024 * 1024), "in.wav", "audio/wav")})
    Worker(settings, backend, engine).run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and "the limit is 1 MB" in rec.error and engine.calls == []


def test_embedded_sweep_removes_expired_results_and_abandoned_uploads(settings, engine):
    import os

    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    old, fresh = submit(backend), submit(backend)
    Worker(settings, backend, engine).run_once(1.0)
    Worker(settings, backend, engine).run_once(1.0)
    old_keys = backend.store.get(old).blob_keys
    backend.blobs.put("uploads/pending/abc/song.wav", b"RIFF", "audio/wav")
    backend.blobs.put("uploads/pending/new/song.wav", b"RIFF", "audio/wav")
    two_days_ago = time.time() - 2 * 86400
    os.utime(backend.blobs.local_path("uploads/pending/abc/song.wav"), (two_days_ago, two_days_ago))
    backend.store.db.read().execute(  # age the first result past the retention
        "UPDATE tasks SET finished_at = ? WHERE task_id = ?", (time.time() - 8 * 86400, old))

    assert backend.sweep_expired() == 2
    assert backend.store.get(old) is None and all(backend.blobs.size(k) is None for k in old_keys)
    assert backend.store.get(fresh).status == SUCCEEDED
    assert all(backend.blobs.size(k) is not None for k in backend.store.get(fresh).blob_keys)
    assert backend.blobs.size("uploads/pending/abc/song.wav") is None
    assert backend.blobs.size("uploads/pending/new/song.wav") is not None


def test_embedded_sweep_keeps_old_uploads_that_queued_tasks_still_need(settings, engine):
    import os

    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    key = "uploads/pending/0123456789abcdef0123456789abcdef/song.wav"
    backend.blobs.put(key, b"RIFF", "audio/wav")
    three_days_ago = time.time() - 3 * 86400
    os.utime(backend.blobs.local_path(key), (three_days_ago, three_days_ago))
    task_id = submit(backend, task_type="cover", src_audio_key=key)  # waited in the queue for days
    own = backend.store.get(task_id).request.src_audio_key  # the task's copy (as old: a hard link)
    backend.store.db.read().execute(  # a task recorded before tasks copied their uploads
        "UPDATE tasks SET blob_keys = ? WHERE task_id = ?", (f'["{key}", "{own}"]', task_id))

    assert backend.sweep_expired() == 0
    assert backend.blobs.get(key) == b"RIFF" and backend.blobs.get(own) == b"RIFF"
    assert backend.store.get(task_id).status == QUEUED


def test_generation_past_its_deadline_fails_and_the_worker_goes_on(settings, backend, engine):
    # One worker, one limit (Settings are frozen): long enough that a plain task never reaches it under load
    settings = settings.model_copy(update={"generation_timeout": 1.0})
    slow = submit(backend, prompt="slow")
    engine.before_generate = lambda progress: (time.sleep(1.1), progress(0.5, "dit"))
    worker = Worker(settings, backend, engine)
    worker.run_once(1.0)
    rec = backend.store.get(slow)
    assert rec.status == FAILED and "timed out" in rec.error and "ACESTEP_GENERATION_TIMEOUT" in rec.error

    engine.before_generate = None
    fine = submit(backend, prompt="fine")
    worker.run_once(1.0)
    assert backend.store.get(fine).status == SUCCEEDED


def test_hung_generation_lets_its_lease_lapse_for_another_worker(settings, engine):
    """No progress for ACESTEP_STALL_TIMEOUT: leases stop being extended, the task is redelivered and
    finished elsewhere, and the hung call's late output is discarded."""
    from service.embedded import make_embedded_backend

    settings = settings.model_copy(update={"visibility_timeout": 0.6, "stall_timeout": 0.3})
    backend = make_embedded_backend(settings)
    task_id = submit(backend)
    unblock, stalled = threading.Event(), threading.Event()
    engine.before_generate = lambda progress: unblock.wait(30)  # hangs without reporting progress
    hung = Worker(settings, backend, engine, worker_id="hung", on_stalled=stalled.set)
    runner = threading.Thread(target=hung.run_once, args=(1.0,))
    runner.start()
    try:
        assert stalled.wait(10), "the stall was not detected"
        healthy_engine = ScriptedEngine()
        assert Worker(settings, backend, healthy_engine, worker_id="healthy").run_once(10.0) is True
        rec = backend.store.get(task_id)
        assert rec.status == SUCCEEDED and rec.worker_id == "healthy" and rec.attempt == 2
    finally:
        unblock.set()
        runner.join(10)
    assert backend.store.get(task_id).result == rec.result  # the hung attempt's late result was dropped
    assert all(k.startswith(f"outputs/{task_id}/2-") for k in rec.blob_keys if k.startswith("outputs/"))


class RecordingMetrics:
    """A MetricsSink that keeps what it is given."""

    def __init__(self):
        self.tasks, self.depths = [], []

    def task_finished(self, metrics):
        self.tasks.append(metrics)

    def queue_depth(self, waiting):
        self.depths.append(waiting)

    def worker_load_failed(self):
        self.depths.append("load failed")


def test_worker_beats_with_its_running_task_and_forgets_itself_on_stop(settings, backend, engine):
    task_id = submit(backend)
    seen = []
    worker = Worker(settings, backend, engine, worker_id="beating")
    engine.before_generate = lambda progress: (progress(0.1, "dit"), seen.append(worker.heartbeat()))
    worker.heartbeat_seconds = 0.05
    runner = threading.Thread(target=worker.run_forever, kwargs={"poll_seconds": 0.05})
    runner.start()
    deadline = time.monotonic() + 10
    beats: list = []
    # the task finishes, then a later beat reports the worker idle (beats come every 0.05 s)
    while time.monotonic() < deadline:
        beats = backend.store.heartbeats()
        if backend.store.get(task_id).status == SUCCEEDED and beats and beats[0].state == "idle":
            break
        time.sleep(0.02)
    worker.request_stop()
    runner.join(10)
    assert [b.worker_id for b in beats] == ["beating"] and beats[0].state == "idle"
    during = seen[0]
    assert during.state == "running" and during.task_ids == [task_id]
    assert abs(during.last_progress_at - time.time()) < 5
    assert backend.store.heartbeats() == []


def test_task_log_lines_carry_task_id_and_attempt(settings, backend, engine, caplog):
    from service.observability.logs import ContextFilter

    caplog.handler.addFilter(ContextFilter())
    engine_log = logging.getLogger("engine.service")
    engine.before_generate = lambda progress: engine_log.warning("engine speaking")
    task_id = submit(backend)
    with caplog.at_level(logging.INFO):
        Worker(settings, backend, engine).run_once(1.0)
    by_message = {r.getMessage(): r for r in caplog.records}
    for message in ("engine speaking", f"task {task_id} succeeded (1 file(s))"):
        assert by_message[message].task_id == task_id and str(by_message[message].attempt) == "1", message


def test_worker_reports_task_metrics(settings, backend, engine):
    metrics = RecordingMetrics()
    ok = submit(backend, prompt="fine")
    worker = Worker(settings, backend, engine, metrics=metrics)
    worker.run_once(1.0)
    engine.error = GenerationError("no such thing")
    bad = submit(backend, prompt="bad")
    worker.run_once(1.0)
    assert [m.status for m in metrics.tasks] == [SUCCEEDED, FAILED]
    good, failed = metrics.tasks
    assert good.queue_wait_s is not None and good.queue_wait_s >= 0 and good.run_s >= 0 and good.reason is None
    assert failed.reason == "rejected"
    assert backend.store.get(ok).status == SUCCEEDED and backend.store.get(bad).error == "no such thing"


def test_a_stored_request_that_no_longer_parses_fails_its_task_with_that_reason(settings, backend, engine):
    metrics = RecordingMetrics()
    task_id = submit(backend, prompt="old")
    corrupt_request(backend, task_id, '{"prompt": "old", "inference_steps": 0}')
    Worker(settings, backend, engine, metrics=metrics).run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and rec.reason is FailureReason.INVALID_REQUEST
    assert "no longer parses" in rec.error and "inference_steps" in rec.error
    assert [m.reason for m in metrics.tasks] == ["rejected"] and engine.calls == []
    assert backend.queue.receive(0, 30) is None  # acked: not delivered again


def test_broken_worker_fails_waiting_tasks_with_its_load_error(settings, backend, engine):
    from service.broken_worker import BrokenWorker
    from service.observability.health import check_health, unservable_reason

    task_id = submit(backend)
    broken = BrokenWorker(settings, backend, "ModelNotFound: no weights for acestep-v15-turbo", worker_id="broken")
    backend.store.record_heartbeat(broken.heartbeat())
    assert "no weights for acestep-v15-turbo" in unservable_reason(backend)
    report = check_health(backend, settings.stall_timeout)
    assert "worker broken cannot serve: ModelNotFound: no weights" in report.reasons[0]
    assert broken.run_once(1.0) is True
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and "could not load its models" in rec.error and "no weights" in rec.error
    assert backend.queue.size() == 0


def test_broken_worker_leaves_tasks_to_a_working_worker(settings, backend, engine):
    from service.broken_worker import BrokenWorker
    from service.observability.health import unservable_reason

    working = Worker(settings, backend, engine, worker_id="working")
    backend.store.record_heartbeat(working.heartbeat())
    broken = BrokenWorker(settings, backend, "OSError: disk full", worker_id="broken")
    backend.store.record_heartbeat(broken.heartbeat())
    assert unservable_reason(backend) is None
    task_id = submit(backend)
    assert broken.run_once(0.1) is False
    assert backend.store.get(task_id).status == QUEUED
    working.run_once(1.0)
    assert backend.store.get(task_id).status == SUCCEEDED


def test_cancelled_queued_task_never_reaches_the_engine(settings, backend, engine):
    from service.cancellation import cancel_task

    task_id = submit(backend)
    assert cancel_task(backend, task_id).cancelled_now is True
    Worker(settings, backend, engine).run_once(0.5)
    assert engine.calls == [] and backend.store.get(task_id).status == "cancelled"
    assert backend.queue.receive(0, 5) is None  # acked (embedded: removed at once)


def test_cancel_stops_a_running_generation_at_its_next_step(settings, backend, engine):
    from service.cancellation import cancel_task

    task_id = submit(backend)
    steps: list[float] = []

    def cancel_midway(progress):
        progress(0.1, "dit")
        assert cancel_task(backend, task_id).cancelled_now is True
        for i in range(2, 100):  # the engine's per-step callback: the watch raises within 0.5 s
            steps.append(i / 100)
            progress(i / 100, "dit")
            time.sleep(0.02)

    engine.before_generate = cancel_midway
    worker = Worker(settings, backend, engine)
    worker.run_once(1.0)
    assert len(steps) < 40  # stopped early, not after all 98 steps
    rec = backend.store.get(task_id)
    assert rec.status == "cancelled" and rec.result is None and rec.error == "cancelled by the client"
    assert backend.queue.receive(0, 0.1) is None  # acked, not released for another worker
    # the worker goes on with the next task
    engine.before_generate = None
    nxt = submit(backend)
    worker.run_once(1.0)
    assert backend.store.get(nxt).status == SUCCEEDED


def test_embedded_sweep_keeps_an_upload_an_expired_task_shared_and_collects_dead_submits(settings, engine):
    """Issue 21.16: an expired task's files went with it, also a direct upload a queued task still used;
    the upload folder of a submit that died before its record was never collected."""
    import os

    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    key = "uploads/pending/0123456789abcdef0123456789abcdef/song.wav"
    backend.blobs.put(key, b"RIFF", "audio/wav")
    done = submit(backend, task_type="cover", src_audio_key=key)
    Worker(settings, backend, engine).run_once(1.0)
    waiting = submit(backend, task_type="cover", src_audio_key=key)  # the same upload, reused
    backend.store.db.read().execute(  # age the finished one past the retention
        "UPDATE tasks SET finished_at = ? WHERE task_id = ?", (time.time() - 8 * 86400, done))
    dead = "uploads/0f1e2d3c-dead-submit/src_audio.wav"  # stored, then the submit died before its record
    backend.blobs.put(dead, b"RIFF", "audio/wav")
    two_hours_ago = time.time() - 7200
    os.utime(backend.blobs.local_path(dead), (two_hours_ago, two_hours_ago))
    folder = os.path.dirname(backend.blobs.local_path(dead))

    assert backend.sweep_expired() == 2  # the expired task and the dead submit's file
    assert backend.store.get(done) is None and backend.blobs.get(key) == b"RIFF"
    assert backend.blobs.size(dead) is None and not os.path.exists(folder)
    assert backend.store.get(waiting).status == QUEUED
