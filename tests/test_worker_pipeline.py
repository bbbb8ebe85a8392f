"""The pipelined worker (ACESTEP_PIPELINE) on both backends: a batch is encoded (in encoder
processes), stored and recorded in the post-processing stage while the engine runs the next one.

Each test holds the post-processing stage at a known point by blocking the blob store's `put` (the
stage's first write), so what must happen meanwhile can be observed without timing guesses.
"""
from __future__ import annotations

import dataclasses
import io
import threading
from concurrent.futures import Future

import pytest
import soundfile as sf

from engine.types import EncodedAudio, PendingAudio
from engine.encoder_pool import EncoderPool, default_processes
from service.ports import FAILED, RUNNING, SUCCEEDED, TERMINAL
from service.worker import Worker
from tests.live_server import poll_until
from tests.worker_support import BAD_SEED, ScriptedEngine, submit


@pytest.fixture(scope="module")
def encoder():
    pool = EncoderPool(processes=1)  # one process for the module: spawning one takes a second or so
    yield pool
    pool.close()


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"pipeline": True})  # auto would be off: these engines say they run on the CPU


@pytest.fixture
def engine():
    e = ScriptedEngine()
    e.defer = True  # unencoded audio: the worker's encoder processes encode it
    return e


class _GatedBlobs:
    """The real blob store, with `put` held at a gate the test opens."""

    def __init__(self, blobs):
        self._blobs, self.gate, self.waiting = blobs, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._blobs, name)

    def put(self, key, data, content_type):
        self.waiting.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self._blobs.put(key, data, content_type)


class _AckAfterRecord:
    """The real queue; every ack checks that its task's outcome is already recorded."""

    def __init__(self, queue, store):
        self._queue, self._store, self.acked = queue, store, []

    def __getattr__(self, name):
        return getattr(self._queue, name)

    def ack(self, lease):
        record = self._store.get(lease.task_id)
        assert record is not None and record.status in TERMINAL, f"{lease.task_id} acked before it was recorded"
        self.acked.append(lease.task_id)
        self._queue.ack(lease)


def _decodes(backend, key: str) -> bool:
    data, sr = sf.read(io.BytesIO(backend.blobs.get(key)))
    return sr == 8000 and data.shape[1] == 2


def test_next_batch_generates_while_the_previous_one_is_recorded(settings, backend, engine, encoder):
    settings = settings.model_copy(update={"batch_compatible_tasks": False})
    gated = _GatedBlobs(backend.blobs)
    queue = _AckAfterRecord(backend.queue, backend.store)
    worker = Worker(settings, dataclasses.replace(backend, blobs=gated, queue=queue), engine, encoder=encoder)
    first, second, third = (submit(backend, seeds=[i]) for i in (1, 2, 3))
    try:
        assert worker.run_once(1.0, overlap=True)
        assert gated.waiting.wait(30)  # the first batch's audio is encoded and waits to be stored
        assert worker.run_once(1.0, overlap=True)  # the engine runs the second meanwhile
        assert len(engine.calls) == 2 and backend.store.get(first).status == RUNNING
        assert worker.heartbeat().state == "running" and first in worker.heartbeat().task_ids
        gated.gate.set()
        assert worker.run_once(1.0, overlap=True)
    finally:
        gated.gate.set()
        worker.close()  # drains
    assert queue.acked == [first, second, third]  # recorded and acked in the order they ran
    for task_id in (first, second, third):
        rec = backend.store.get(task_id)
        assert rec.status == SUCCEEDED and rec.attempt == 1
        assert _decodes(backend, rec.result.audios[0].key)
    assert backend.queue.receive(0, 5) is None


def test_a_failing_encode_fails_only_its_own_task(settings, backend, engine, encoder):
    good = submit(backend, seeds=[5], prompt="same")
    bad = submit(backend, seeds=[BAD_SEED], prompt="same")  # batched with `good`: one engine call
    Worker(settings, backend, engine, encoder=encoder).run_once(1.0)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 2
    rec = backend.store.get(bad)
    assert rec.status == FAILED and "NaN or infinite samples" in rec.error
    rec = backend.store.get(good)
    assert rec.status == SUCCEEDED and _decodes(backend, rec.result.audios[0].key)
    assert rec.result.generation_info["timings"]["audio_encoding_s"] > 0  # measured in the encoder process
    assert backend.queue.receive(0, 5) is None


def test_leases_stay_hidden_while_tasks_wait_for_post_processing(settings, backend, engine, encoder):
    settings = settings.model_copy(update={"visibility_timeout": 0.5})
    gated = _GatedBlobs(backend.blobs)
    worker = Worker(settings, dataclasses.replace(backend, blobs=gated), engine, encoder=encoder)
    task_id = submit(backend)
    try:
        worker.run_once(1.0, overlap=True)
        assert gated.waiting.wait(30)
        # Three lease lengths pass while the task waits to be stored: nobody else may receive it.
        assert backend.queue.receive(3 * settings.visibility_timeout, 30) is None
        gated.gate.set()
    finally:
        gated.gate.set()
        worker.close()
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and rec.attempt == 1


def test_shutdown_drains_the_post_processing_stage(settings, backend, engine, encoder):
    gated = _GatedBlobs(backend.blobs)
    worker = Worker(settings, dataclasses.replace(backend, blobs=gated), engine, encoder=encoder)
    task_id = submit(backend)
    runner = threading.Thread(target=worker.run_forever, kwargs={"poll_seconds": 0.1})
    runner.start()
    try:
        assert gated.waiting.wait(30)
        worker.request_stop()  # the first signal: take no new work, finish what is in hand
        runner.join(0.5)
        assert runner.is_alive()  # still draining
        gated.gate.set()
        runner.join(30)
        assert not runner.is_alive()
    finally:
        gated.gate.set()
        worker.request_stop()
        runner.join(30)
    assert backend.store.get(task_id).status == SUCCEEDED
    assert backend.queue.receive(0, 5) is None


class _StuckEncoder(EncoderPool):
    """Encodings that never finish (a 240 s mp3 still encoding when the second signal comes)."""

    submitted = 0

    def submit(self, pending: PendingAudio) -> "Future[tuple[EncodedAudio, float]]":
        self.submitted += 1
        return Future()


def test_a_second_signal_hands_back_what_is_not_encoded(settings, backend, engine):
    worker = Worker(settings, backend, engine, encoder=_StuckEncoder(1))
    task_id = submit(backend)
    worker.run_once(1.0, overlap=True)
    assert backend.store.get(task_id).status == RUNNING
    worker.request_stop(cancel_running=True)
    worker.close()
    rec = backend.store.get(task_id)
    assert rec.status == RUNNING and rec.given_back == 1  # handed back, not counted as a lost delivery
    lease = poll_until("the task to be free for another worker", lambda: backend.queue.receive(0.2, 30), 10)
    assert lease.task_id == task_id


class _RefusingEncoder(EncoderPool):
    """Encoder processes that cannot be started (out of file descriptors, out of memory)."""

    def submit(self, pending: PendingAudio) -> "Future[tuple[EncodedAudio, float]]":
        raise OSError("cannot start an encoder process")


def test_an_encoder_that_cannot_start_fails_the_task_with_its_reason(settings, backend, engine):
    worker = Worker(settings, backend, engine, encoder=_RefusingEncoder(1))
    task_id = submit(backend)
    worker.run_once(1.0, overlap=True)
    worker.close()
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and "could not start encoding the audio" in rec.error
    assert worker._post is not None and worker._post.idle()  # nothing left claiming to be in the stage
    assert backend.queue.receive(0, 5) is None  # acked, not kept alive by the lease keeper


class _InterruptedEncoder(EncoderPool):
    """An encode that ends in KeyboardInterrupt, as a pool process hit by a terminal's Ctrl+C reports it."""

    def submit(self, pending: PendingAudio) -> "Future[tuple[EncodedAudio, float]]":
        future: "Future[tuple[EncodedAudio, float]]" = Future()
        future.set_exception(KeyboardInterrupt())
        return future


def test_an_interrupted_encode_fails_its_task_and_the_stage_keeps_running(settings, backend, engine):
    settings = settings.model_copy(update={"pipeline_depth": 1})
    worker = Worker(settings, backend, engine, encoder=_InterruptedEncoder(1))
    first, second = submit(backend, prompt="one"), submit(backend, prompt="two")
    worker.run_once(1.0, overlap=True)
    worker.run_once(1.0, overlap=True)  # depth 1: would wait forever for a dead stage
    worker.close()
    for task_id in (first, second):
        rec = backend.store.get(task_id)
        assert rec.status == FAILED and "KeyboardInterrupt" in rec.error


def test_a_hung_encode_fails_after_the_encode_timeout_and_restarts_the_encoders(settings, backend, engine):
    settings = settings.model_copy(update={"stall_timeout": 0.5})
    encoder = _StuckEncoder(1)
    reset = []
    encoder.reset = lambda: reset.append(True)  # type: ignore[method-assign]
    worker = Worker(settings, backend, engine, encoder=encoder)
    task_id = submit(backend)
    worker.run_once(1.0, overlap=True)
    poll_until("the hung encode to time out", lambda: backend.store.get(task_id).status == FAILED, 30)
    worker.close()
    assert "did not finish within 0.5 s" in backend.store.get(task_id).error
    assert reset == [True]


def test_encoder_processes_ignore_a_terminals_ctrl_c(encoder):
    import os
    import signal

    pool = encoder._executor()
    handlers = {pool.submit(signal.getsignal, signal.SIGINT).result(30) for _ in range(3)}
    assert handlers == {signal.SIG_IGN}
    assert os.getpid() not in {pool.submit(os.getpid).result(30)}


@pytest.mark.parametrize("pipeline", [False, True])
def test_without_pipeline_or_encoder_the_engine_encodes(settings, backend, engine, pipeline):
    # off: all in sequence; on without an encoder: only storing overlaps
    settings = settings.model_copy(update={"pipeline": pipeline})
    encoder = _StuckEncoder(1)
    worker = Worker(settings, backend, engine, encoder=encoder if not pipeline else None)
    task_id = submit(backend)
    assert worker.run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and _decodes(backend, rec.result.audios[0].key)
    assert encoder.submitted == 0


def test_pipeline_auto_is_on_for_a_gpu_engine_only(settings, engine):
    from service.config import load_settings
    from service.worker import pipeline_enabled

    auto = load_settings(env={"ACESTEP_PIPELINE": "auto"}, dotenv_path=None)
    assert auto.pipeline is None and load_settings(env={}, dotenv_path=None).pipeline is None
    assert pipeline_enabled(auto, engine) is False  # "device": "cpu"
    engine.describe = lambda: {"device": "cuda:0"}
    assert pipeline_enabled(auto, engine) is True
    assert pipeline_enabled(load_settings(env={"ACESTEP_PIPELINE": "false"}, dotenv_path=None), engine) is False


def test_encoder_processes_are_sized_to_the_machine():
    assert default_processes(16) == 15 and default_processes(2) == 1 and default_processes(1) == 1
    assert EncoderPool(3).processes == 3 and EncoderPool(0).processes == default_processes()


_KILLED_WORKER = """
import os
from multiprocessing import resource_tracker
from engine.encoder_pool import EncoderPool

encoder = EncoderPool(processes=1)
print(encoder._executor().submit(os.getpid).result(60), resource_tracker._resource_tracker._pid, flush=True)
os.kill(os.getpid(), 9)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped by its new parent
    except FileNotFoundError:
        return True


@pytest.mark.e2e
def test_a_killed_workers_encoder_and_resource_tracker_end_with_it():
    """Issue 21.15: three kills of a pipelined worker left six stray processes (an encoder and the
    resource tracker its pipe kept open, each time)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _KILLED_WORKER], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and pids[0] != pids[1]  # the encoder, the resource tracker
    poll_until("the encoder and the resource tracker to exit", lambda: all(_gone(p) for p in pids), timeout=20)
