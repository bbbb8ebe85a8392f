"""Recording a task's outcome: the one path every worker ends a task through.

The worker (directly, or in its post-processing stage: service/post_stage.py) and the broken worker
(service/broken_worker.py) all store results, record failures with their reason, hand tasks back,
ack leases, report metrics and queue webhooks here.

Every write is fenced by the attempt: `store.finish` only accepts the task's current attempt, and a
worker whose attempt no longer holds the task never acks or releases its lease (on SQS an old
receipt can still delete the message the new holder owns).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from engine.types import GenerationCancelled, GenerationResult

from .blob_keys import output_key
from .lease_keeper import LeaseKeeper
from .observability.logs import log_context
from .observability.metrics import MetricsSink, NoMetrics, TaskMetrics
from .ports import Backend, Lease
from .records import TERMINAL, AudioFile, FailureReason, StoredRequestInvalid, TaskRecord, TaskResult
from .storage_errors import StorageFull
from .task_errors import describe_failure

log = logging.getLogger(__name__)

# What the engine gave for one task: its result, or why it has none.
Outcome = Union[GenerationResult, BaseException]


@dataclass
class HeldTask:
    """A task this worker holds: its lease, the attempt that holds it, and its times (for metrics)."""
    lease: Lease
    attempt: int
    created_at: float
    started_at: Optional[float]

    @property
    def task_id(self) -> str:
        return self.lease.task_id


class OutcomeRecorder:
    def __init__(self, backend: Backend, metrics: Optional[MetricsSink] = None,
                 on_finished: Optional[Callable[[str], None]] = None, keeper: Optional[LeaseKeeper] = None):
        self.backend = backend
        self.metrics: MetricsSink = metrics or NoMetrics()
        self.on_finished = on_finished  # a task ended here (webhooks); must not block
        # The post-processing stage's keeper (pipelined worker): a lease leaves it before its ack or release.
        self.keeper = keeper

    def record(self, batch: Sequence[HeldTask], outcomes: Sequence[Outcome]) -> None:
        """Store and record each task's outcome, then ack it. Raises StorageFull (after handing the
        rest back) when there is no room for a result."""
        full: Optional[StorageFull] = None
        for task, outcome in zip(batch, outcomes):
            with log_context(task_id=task.task_id, attempt=task.attempt):
                if isinstance(outcome, GenerationCancelled):
                    self.give_back(task)
                elif isinstance(outcome, BaseException):
                    self.fail(task, *describe_failure(outcome))
                elif full is not None:
                    self.give_back(task)
                else:
                    try:
                        self.succeed(task, outcome)
                    except StorageFull as exc:  # not the task's fault: hand it back, then back off
                        full = exc
                        log.error("no room to store the result of %s: handing it back", task.task_id)
                        self.give_back_quietly(task)
        if full is not None:
            raise full

    def succeed(self, task: HeldTask, result: GenerationResult) -> None:
        keys: list[str] = []
        audios = []
        info = result.generation_info.copy()
        try:  # storage full part way: what this attempt wrote goes, and the outage is raised
            for i, audio in enumerate(result.audios):
                key = output_key(task.task_id, task.attempt, i, audio.format)
                self.backend.blobs.put(key, audio.data, audio.content_type)
                keys.append(key)
                audios.append(AudioFile(key=key, format=audio.format, seed=audio.seed,
                                        duration=round(audio.duration_seconds, 3),
                                        sample_rate=audio.sample_rate, channels=audio.channels))
            whole = TaskResult(audios=audios, metas=result.metas, generation_info=info,
                               dit_model=result.dit_model, lm_model=result.lm_model)
            finished = self.backend.store.finish(task.task_id, task.attempt, result=whole, blob_keys=keys)
        except StorageFull:
            for written in keys:
                self.backend.blobs.delete(written)
            raise
        if finished:
            log.info("task %s succeeded (%d file(s))", task.task_id, len(keys))
            self._report(TaskMetrics.succeeded(whole, task.created_at, task.started_at, time.time()))
            self._finished(task.task_id)
        else:  # another attempt finished it first; drop our copy
            for key in keys:
                self.backend.blobs.delete(key)
            log.warning("task %s was finished by another attempt; discarded attempt %d", task.task_id, task.attempt)
        self.ack(task.lease, task.attempt, finished)

    def fail(self, task: HeldTask, message: str, reason: FailureReason) -> None:
        log.warning("task %s failed: %s", task.task_id, message)
        finished = self.backend.store.finish(task.task_id, task.attempt, error=message, reason=reason)
        if finished:
            self._report(TaskMetrics.failed(reason, task.created_at, task.started_at, time.time()))
            self._finished(task.task_id)
        self.ack(task.lease, task.attempt, finished)

    def claim(self, lease: Lease, worker_id: str) -> Optional[TaskRecord]:
        """Claim the leased task (one store write, which also returns it, its request parsed), or settle the
        lease and give None: a task whose stored request no longer parses fails here (it could run nowhere);
        a finished (duplicate delivery) or unknown one is acked."""
        try:
            record = self.backend.store.claim(lease.task_id, worker_id)
        except StoredRequestInvalid as exc:
            with log_context(task_id=lease.task_id):
                self.fail_unclaimed(lease, str(exc), FailureReason.INVALID_REQUEST)
            return None
        if record is None:
            self.backend.queue.ack(lease)
        return record

    def fail_unclaimed(self, lease: Lease, message: str, reason: FailureReason) -> None:
        """A task that cannot even be claimed (its stored request no longer parses) fails as it is."""
        log.warning("task %s failed: %s", lease.task_id, message)
        self.stop_keeping(lease)
        if self.backend.store.fail_unfinished(lease.task_id, message, reason):
            record = self.backend.store.get(lease.task_id)
            created = record.created_at if record is not None else time.time()
            self._report(TaskMetrics.failed(reason, created, None, time.time()))
            self._finished(lease.task_id)
        self.backend.queue.ack(lease)

    def give_back_quietly(self, task: HeldTask) -> None:
        try:
            self.give_back(task)
        except Exception:  # the store may be full too: the lease lapses instead
            log.warning("could not hand %s back; its lease will lapse", task.task_id, exc_info=True)

    def give_back(self, task: HeldTask) -> None:
        """Hand a claimed task back at once, unless a newer attempt holds it already. The store records
        the give-back (fenced by attempt), so it does not count as a lost delivery."""
        self.stop_keeping(task.lease)
        if self.backend.store.give_back(task.task_id, task.attempt):
            self.backend.queue.release(task.lease)
            return
        record = self.backend.store.get(task.task_id)
        if record is None or record.status in TERMINAL:  # cancelled or finished meanwhile
            self.backend.queue.ack(task.lease)
        else:
            log.warning("not giving back %s: attempt %d no longer holds it", task.task_id, task.attempt)

    def ack(self, lease: Lease, attempt: int, finished: bool) -> None:
        """Remove the message once the task is finished. A worker fenced out of `finish` acks only when
        the task is finished (by anyone) or gone: while a newer attempt runs, the message is its
        lease, and an old receipt may still delete it on SQS."""
        self.stop_keeping(lease)
        if not finished:
            record = self.backend.store.get(lease.task_id)
            if record is not None and record.status not in TERMINAL:
                log.warning("lease of %s lost to attempt %d; leaving its message alone (attempt %d)",
                            lease.task_id, record.attempt, attempt)
                return
        self.backend.queue.ack(lease)

    def stop_keeping(self, lease: Lease) -> None:
        """Before an ack or a release: the post-processing stage's keeper must not extend it afterwards
        (a late extension would hide a released task again)."""
        if self.keeper is not None:
            self.keeper.remove(lease)

    def _finished(self, task_id: str) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(task_id)
            except Exception:  # a notification must never fail a task
                log.warning("could not queue the webhook of %s", task_id, exc_info=True)

    def _report(self, metrics: TaskMetrics) -> None:
        try:
            self.metrics.task_finished(metrics)
        except Exception:  # metrics must never fail a task
            log.warning("could not report task metrics", exc_info=True)
