"""Lost leases on both backends (SQS through moto): stale acknowledgements, carried tasks, crashes.

Issue 11, defects 3 and 4: a worker whose lease was lost must not ack, extend or give back the
message a newer attempt holds; a task held for the next batch keeps its lease and no crash counts
against it until it has run.
"""
from __future__ import annotations

import dataclasses
import time

import pytest

from service.ports import QUEUED, RUNNING, SUCCEEDED
from service.worker import Worker
from tests.live_server import poll_until
from tests.worker_support import ScriptedEngine, submit


@pytest.fixture
def engine():
    return ScriptedEngine()


class _LosesLeases:
    """The queue as a worker sees it when its extensions do not get through (a long GC pause, a network
    partition): everything else is the real queue."""

    def __init__(self, queue):
        self._queue = queue

    def __getattr__(self, name):
        return getattr(self._queue, name)

    def extend(self, lease, visibility_timeout):
        pass


def test_a_stale_worker_leaves_the_message_of_the_newer_attempt_alone(settings, backend, engine):
    settings = settings.model_copy(update={"visibility_timeout": 1.0})
    task_id = submit(backend)
    stale = Worker(settings, dataclasses.replace(backend, queue=_LosesLeases(backend.queue)), engine)
    taken = {}

    def lease_lapses_and_b_takes_over(progress):
        if taken:
            return
        # B receives the redelivered message and claims the task, then dies holding it (2 s lease).
        taken["lease"] = poll_until("the redelivery", lambda: backend.queue.receive(0.2, 2.0), 10)
        taken["attempt"] = backend.store.claim(task_id, "worker-b").attempt
        progress(0.5, "dit")

    engine.before_generate = lease_lapses_and_b_takes_over
    stale.run_once(1.0)
    rec = backend.store.get(task_id)
    assert rec.status == RUNNING and rec.attempt == taken["attempt"] == 2  # A's result was refused
    # B is dead; its message must still be there for C, which finishes the task.
    engine.before_generate = None
    rescuer = Worker(settings, backend, engine)
    poll_until("a rescuer to run the task", lambda: rescuer.run_once(0.5), 10)
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and rec.attempt == 3
    assert len(rec.result.audios) == 1 and len(rec.blob_keys) == 1  # A's copy was discarded


def test_a_carried_task_keeps_its_lease_while_the_batch_runs(settings, backend, engine):
    settings = settings.model_copy(update={"visibility_timeout": 1.0})
    batch = submit(backend, prompt="short", audio_duration=10)
    carried = submit(backend, prompt="long", audio_duration=20)  # cannot share a call with the first
    worker = Worker(settings, backend, engine)
    stolen = []

    def long_batch(progress):
        if stolen:
            return
        end = time.monotonic() + 3 * settings.visibility_timeout
        while time.monotonic() < end:  # the engine makes progress well past the carried lease's timeout
            progress(0.1, "dit")
            stolen.append(backend.queue.receive(0, 30))
            time.sleep(0.1)

    engine.before_generate = long_batch
    worker.run_once(1.0)
    assert [s for s in stolen if s is not None] == []  # nobody else could take the held task
    assert backend.store.get(carried).status == QUEUED
    worker.run_once(0)
    for task_id in (batch, carried):
        rec = backend.store.get(task_id)
        assert rec.status == SUCCEEDED and rec.attempt == 1


def test_crashes_while_a_task_is_only_held_do_not_count_against_it(settings, backend, engine):
    settings = settings.model_copy(update={"visibility_timeout": 0.5})
    task_id = submit(backend)
    for _ in range(settings.max_receives):  # each holder dies before the task runs (SQS then dead-letters it)
        poll_until("a delivery", lambda: backend.queue.receive(0.2, settings.visibility_timeout), 10)
    worker = Worker(settings, backend, engine)

    def runs():
        worker.dead_letter_chore.last_run = None  # the AWS drain, due every round here
        worker.run_once(0.2)
        return backend.store.get(task_id).status != QUEUED

    poll_until("the task to run", runs, 15)
    rec = backend.store.get(task_id)
    assert rec.status == SUCCEEDED and rec.attempt == 1 and rec.error is None
