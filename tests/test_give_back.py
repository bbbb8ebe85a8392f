"""A give-back (a worker stopping mid-task) is not a lost delivery: counted in the task store, on both backends.

SQS counts every receive of a message and its redrive policy cannot be told a give-back from a crash,
so the SQS queue replaces a given-back message with a fresh one that carries the deliveries lost so far.
The embedded queue dead-letters by claims less give-backs (attempt - given_back, from the store).
"""
from __future__ import annotations

from service.ports import FAILED, RUNNING, SUCCEEDED, TaskRecord
from service.records import GIVEN_BACK_STAGE
from service.worker import Worker
from tests.worker_support import ScriptedEngine, submit
from engine.request import GenerationRequest


def test_give_back_is_fenced_by_attempt_and_counted(backend):
    backend.store.create(TaskRecord(task_id="t", request=GenerationRequest()))
    first = backend.store.claim("t", "w1").attempt
    assert backend.store.give_back("t", first + 1) is False  # not the holder
    assert backend.store.give_back("t", first) is True
    rec = backend.store.get("t")
    assert (rec.status, rec.given_back, rec.stage) == (RUNNING, 1, GIVEN_BACK_STAGE)
    second = backend.store.claim("t", "w2").attempt
    assert backend.store.give_back("t", first) is False  # a stale holder gives back nothing
    assert backend.store.finish("t", second, error="x")
    assert backend.store.give_back("t", second) is False  # finished
    assert backend.store.get("t").given_back == 1


def _stopping_worker(settings, backend) -> Worker:
    """A worker told to stop (and give its task back) as soon as its engine starts."""
    engine = ScriptedEngine()
    worker = Worker(settings, backend, engine)
    engine.before_generate = lambda progress: (worker.request_stop(cancel_running=True), progress(0.1, "dit"))
    return worker


def test_interruptions_never_dead_letter_a_healthy_task(settings, backend):
    task_id = submit(backend)
    interruptions = settings.max_receives + 2
    for _ in range(interruptions):  # e.g. spot interruptions, one after another
        assert _stopping_worker(settings, backend).run_once(1.0) is True
        assert backend.store.get(task_id).status == RUNNING
    assert Worker(settings, backend, ScriptedEngine()).run_once(1.0) is True
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED, rec.error
    assert (rec.attempt, rec.given_back) == (interruptions + 1, interruptions)
    assert backend.queue.receive(0, 30) is None  # no stray message left behind


def test_lost_deliveries_still_add_up_across_a_give_back(settings, backend):
    assert settings.max_receives == 3
    task_id = submit(backend)

    def crash() -> None:  # claimed, then the worker dies: its lease lapses
        lease = backend.queue.receive(1.0, 30)
        assert lease is not None and backend.store.claim(lease.task_id, "doomed") is not None
        backend.queue.extend(lease, 0)

    crash()
    crash()
    assert _stopping_worker(settings, backend).run_once(1.0) is True  # handed back: not counted
    crash()
    engine = ScriptedEngine()
    assert Worker(settings, backend, engine).run_once(1.0) is False  # not delivered again
    if backend.drain_dead_letters is not None:  # SQS: the worker drains its DLQ every 30 s
        assert backend.drain_dead_letters() == 1
    rec = backend.store.get(task_id)
    assert rec.status == FAILED and "after 3 deliveries" in rec.error, rec.error
    assert engine.calls == []


def test_a_task_that_hangs_on_its_last_delivery_fails_with_the_timeout(settings, tmp_path):
    """Earlier stalls are retried elsewhere (run_watch); the last one fails the task, saying why."""
    import threading

    from tests.conftest import open_backend

    settings = settings.model_copy(update={"visibility_timeout": 0.6, "stall_timeout": 0.3, "max_receives": 2})
    for kind in ("embedded", "aws"):
        with open_backend(kind, settings, tmp_path / kind) as backend:
            task_id = submit(backend)
            lease = backend.queue.receive(1.0, 30)  # a first delivery was lost (its worker crashed)
            backend.store.claim(task_id, "doomed")
            backend.queue.extend(lease, 0)
            unblock, stalled = threading.Event(), threading.Event()
            engine = ScriptedEngine()
            engine.before_generate = lambda progress: unblock.wait(30)  # hangs without reporting progress
            hung = Worker(settings, backend, engine, on_stalled=stalled.set)
            runner = threading.Thread(target=hung.run_once, args=(1.0,))
            runner.start()
            try:
                assert stalled.wait(10), "the stall was not detected"
                rec = backend.store.get(task_id)
                assert rec.status == FAILED, kind
                assert rec.error == "generation timed out: no progress for 0.3 s (ACESTEP_STALL_TIMEOUT) on 2 deliveries"
            finally:
                unblock.set()
                runner.join(10)
            assert backend.queue.receive(0, 30) is None  # acked: not retried
