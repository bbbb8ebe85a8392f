"""Ports: the task store, the task queue and the blob store.

Two adapters implement each port: embedded (SQLite + local files, `service/embedded/`) and AWS
(DynamoDB + SQS + S3, `service/aws/`). The contract tests in tests/test_ports_contract.py run
against both, so anything stated here must hold for both.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Protocol

from engine.request import GenerationRequest
from engine.types import DeviceReport, EncodedAudio, EngineInfo, GenerationResult, ModelInfo, PendingAudio, ProgressCallback

from .refusals import CallerBusy, QueueFull  # raised by the intake adapters; the refusals the API maps
from .signing_keys import SigningKeys
from .records import (
    CANCELLED, FAILED, QUEUED, RUNNING, STATUSES, SUCCEEDED, TERMINAL, FailureReason, StoredRequestInvalid, TaskRecord,
    TaskResult, WorkerHeartbeat,
)



@dataclass(frozen=True)
class CallerLimits:
    """Per caller (TaskRecord.owner), checked in the same write that creates the task."""
    max_queued: int  # waiting tasks
    max_active: int  # waiting + running tasks


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request."""


@dataclass(frozen=True)
class WebhookDue:
    """A task's webhook waiting in the outbox (TaskStore.webhooks_due)."""
    task_id: str
    url: str
    attempts: int  # attempts claimed so far (one whose process died counts)
    due_at: float  # unix time: when it may be (re)tried, or when a claimed attempt's lease runs out


class TaskStore(Protocol):
    def create(self, record: TaskRecord) -> None:
        """Insert a new queued task. Raises if the id exists."""

    def change_token(self) -> Optional[Hashable]:
        """A value that differs whenever any task may have changed since it was taken, cheap enough for
        every poll (no table read); None where the store cannot tell so cheaply (every poll reads)."""
        return None

    def get(self, task_id: str) -> Optional[TaskRecord]: ...

    def get_many(self, task_ids: list[str]) -> dict[str, TaskRecord]: ...

    def find_by_idempotency_key(self, key: str) -> Optional[TaskRecord]:
        """The task submitted with this Idempotency-Key, if it still exists."""

    def delete(self, task_id: str) -> None:
        """Remove a task (used to undo a create when the enqueue fails)."""

    def claim(self, task_id: str, worker_id: str) -> Optional[TaskRecord]:
        """queued -> running, or re-claim a running task whose lease was redelivered.

        Returns the task as claimed (with its new attempt number), or None if finished/unknown.
        Raises StoredRequestInvalid (and claims nothing) when its stored request no longer parses;
        the other reads return such a request as stored, unchecked (records.load_request).
        """

    def update_progress(self, task_id: str, attempt: int, progress: float, stage: str) -> bool:
        """Only the holder of `attempt` may update; returns False when fenced out."""

    def give_back(self, task_id: str, attempt: int) -> bool:
        """The holder of `attempt` hands the task back unfinished (its worker is stopping).

        Counted in `given_back`, so the delivery is not a failed one: a task whose workers keep being
        stopped is never dead-lettered for it. False when fenced out (another attempt, or finished).
        """

    def finish(self, task_id: str, attempt: int, *, result: Optional[TaskResult] = None,
               error: Optional[str] = None, reason: Optional[FailureReason] = None,
               blob_keys: Optional[list[str]] = None) -> bool:
        """running -> succeeded (result) or failed (error, with its reason), only for the current attempt.

        A task finishes once: a late or duplicate worker gets False and must discard its output.
        """

    def fail_unfinished(self, task_id: str, error: str, reason: FailureReason) -> bool:
        """Mark a task failed whatever attempt holds it, unless already finished (poison / dead-letter)."""

    def cancel(self, task_id: str, reason: str) -> bool:
        """queued/running -> cancelled (with `reason` as its error, FailureReason.CANCELLED as its reason),
        whatever attempt holds it.

        False when the task is unknown or already finished. A worker running it is fenced out:
        its next update_progress returns False, and it stops.
        """

    # The webhook outbox: the write that ends a task with a webhook_url (finish, fail_unfinished,
    # cancel) also puts its webhook in the outbox, due at once, so no crash between the two can lose it.

    def webhooks_due(self, now: float, limit: int) -> list[WebhookDue]:
        """Up to `limit` outbox entries due at `now` or earlier, earliest first."""

    def claim_webhook(self, due: WebhookDue, lease_until: float) -> bool:
        """Take `due` for one attempt: counts it and hides the entry until `lease_until` (a process
        that dies mid-attempt leaves it to be retried then). False when another process took it first."""

    def settle_webhook(self, task_id: str, claimed_until: float, retry_at: Optional[float]) -> bool:
        """After an attempt: due again at `retry_at`, or out of the outbox (None: delivered or given up).
        False (and nothing changed) when the claim had lapsed and another process took the entry."""

    def counts(self) -> dict[str, int]:
        """Jobs by status: {queued, running, succeeded, failed, total}."""

    def recent_finished(self, limit: int) -> list[TaskRecord]:
        """The last `limit` finished tasks that ran (started_at set), newest first."""

    def queue_positions(self, task_ids: list[str]) -> dict[str, int]:
        """1-based positions among queued tasks, oldest first, for those of `task_ids` still queued.

        One round trip whatever the number of ids (a poll may ask about 200)."""

    def queued_task_ids(self, limit: int) -> list[str]:
        """Ids of queued tasks, oldest first, at most `limit` (bounded by ACESTEP_QUEUE_MAXSIZE)."""

    def put_meta(self, key: str, value: dict[str, Any]) -> None:
        """Small service-wide facts as JSON objects (records.ModelsMeta under "models")."""

    def get_meta(self, key: str) -> Optional[dict[str, Any]]: ...

    def get_meta_versioned(self, key: str) -> tuple[Optional[dict[str, Any]], int]:
        """A meta value and its version (0: never written), for a put_meta_if against it."""

    def put_meta_if(self, key: str, value: dict[str, Any], version: int) -> bool:
        """Writes `value` as version + 1 only while the stored version is still `version` (0: absent): two
        read-change-write cycles at once cannot both land. False, with nothing written, when another writer
        came first (read again and redo the change). put_meta moves the version on too."""

    def record_heartbeat(self, beat: WorkerHeartbeat) -> None:
        """Store this worker's latest beat (one entry per worker_id)."""

    def heartbeats(self) -> list[WorkerHeartbeat]:
        """The latest beat of every worker seen in the last day."""

    def forget_heartbeat(self, worker_id: str) -> None:
        """A worker that stops cleanly removes its entry."""


@dataclass
class Lease:
    task_id: str
    receipt: str  # opaque handle for extend/ack/release
    receive_count: int


class TaskQueue(Protocol):
    def enqueue(self, task_id: str, max_size: int) -> None:
        """Add a task id; raises QueueFull when `max_size` tasks are already waiting."""

    def receive(self, wait_seconds: float, visibility_timeout: float) -> Optional[Lease]:
        """Take the next visible task id, hidden from others for `visibility_timeout` s.

        Blocks up to `wait_seconds` for one to arrive. An un-acked lease becomes visible again
        when its timeout passes (redelivery after a worker died).
        """

    def receive_interactive(self, visibility_timeout: float) -> Optional[Lease]:
        """The next visible interactive task (service/lanes.py), never a generation; does not wait.
        None when none waits or the queue keeps no separate lane (such tasks then come through receive)."""

    def extend(self, lease: Lease, visibility_timeout: float) -> None:
        """Keep a long-running lease hidden for another `visibility_timeout` s from now."""

    def ack(self, lease: Lease) -> None:
        """The task is done (either way): remove it from the queue."""

    def release(self, lease: Lease) -> None:
        """Give the task back at once for another worker (shutdown without finishing)."""

    def size(self) -> int:
        """Tasks waiting to be received (approximate on SQS)."""


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """Raises KeyError when missing."""

    def size(self, key: str) -> Optional[int]:
        """Bytes stored under `key`, or None when there is nothing (readable) there."""

    def delete(self, key: str) -> None: ...

    def copy(self, src: str, dst: str) -> None:
        """Store what `src` holds under `dst` too (KeyError when `src` is missing); adapters do it cheaper."""
        self.put(dst, self.get(src), "application/octet-stream")

    def local_path(self, key: str) -> Optional[str]:
        """A filesystem path for direct serving, or None (S3)."""

    def presigned_get_url(self, key: str, expires_seconds: int) -> Optional[str]:
        """A URL a client can fetch without credentials, or None (local files)."""

    def presigned_put_url(self, key: str, content_type: str, expires_seconds: int) -> Optional[str]:
        """A URL a client can upload to without credentials, or None (local files)."""


class TaskIntake(Protocol):
    def submit(self, record: TaskRecord, max_queue: int,
               caller_limits: Optional[CallerLimits] = None) -> tuple[TaskRecord, bool]:
        """Create the queued task and enqueue it as one step; returns (task, created).

        When `record.idempotency_key` names an earlier submission, nothing is created and that
        task is returned with created=False (IdempotencyConflict if its request_digest differs).
        Raises QueueFull, having created nothing.
        """


class GenerationEngine(Protocol):
    """What the worker needs from an engine (engine.service.Engine; tests use small stand-ins)."""

    lm_loaded: bool  # False: requests that need the 5 Hz LM are refused before they run

    def models(self) -> list[ModelInfo]: ...

    def describe(self) -> EngineInfo:
        """device, dtype, lm_model, ... for /v1/models."""

    def devices(self) -> Optional[DeviceReport]:
        """What it runs on now, for the heartbeat (None: nothing loaded)."""

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None,
                 progress: Optional[ProgressCallback] = None, encode: bool = True) -> GenerationResult:
        """encode=False: the engine may leave the audio unencoded in `result.pending` (the worker's
        pipeline encodes it in its encoder processes while the engine goes on)."""

    def generate_batch(self, items: list[tuple[GenerationRequest, dict[str, bytes]]],
                       progress: Optional[ProgressCallback] = None, encode: bool = True) -> list[GenerationResult | BaseException]:
        """Requests with one plan.batch_key in one call; a GenerationResult or Exception per item."""


class AudioEncoder(Protocol):
    """Encodes PendingAudio off the worker's thread (engine.encoder_pool.EncoderPool: processes)."""

    def submit(self, pending: PendingAudio) -> "Future[tuple[EncodedAudio, float]]":
        """Start encoding; the future gives the file and the seconds encoding took."""

    def retry(self, pending: PendingAudio, timeout: Optional[float] = None) -> tuple[EncodedAudio, float]:
        """Encode again and wait at most `timeout` s (the first try's encoder died with another item's)."""

    def reset(self) -> None:
        """Stop the encoder processes, hung ones included; later submits start new ones."""

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Backend:
    store: TaskStore
    queue: TaskQueue
    blobs: BlobStore
    intake: TaskIntake
    name: str = "embedded"
    # Moves dead-lettered tasks to `failed` with their reason; returns how many. The embedded
    # queue does this itself as it receives; on AWS the worker calls it now and then (SQS DLQ).
    drain_dead_letters: Optional[Callable[[], int]] = None
    # Deletes finished tasks past their retention, with their audio, and abandoned uploads;
    # returns how many. On AWS, DynamoDB TTL and S3 lifecycle rules do this instead.
    sweep_expired: Optional[Callable[[], int]] = None
    # The secret(s) signed URLs are keyed with, as the backend stores them (service/signing_keys.py).
    signing_keys: Optional[Callable[[], SigningKeys]] = None
    # The secret(s) webhooks are signed with (service/webhooks/signature.py), stored like signing_keys
    # but apart from them: receivers are given this one.
    webhook_keys: Optional[Callable[[], SigningKeys]] = None
    # False while the backend's local storage is (nearly) full: submits get 507 and workers take no
    # task they could not store. None where storage is not local (AWS).
    has_room: Optional[Callable[[], bool]] = None
    # Told the id of each task the backend itself moved to a terminal state (dead-lettered), once, in
    # the process that did it; the worker's entry point points it at the webhooks. Must not block.
    on_task_ended: Optional[Callable[[str], None]] = None

    def task_ended(self, task_id: str) -> None:
        """Tell on_task_ended; a failing listener is logged, never fails the path that ended the task."""
        if self.on_task_ended is None:
            return
        try:
            self.on_task_ended(task_id)
        except Exception:
            logging.getLogger(__name__).warning("could not report the end of task %s", task_id, exc_info=True)


__all__ = ["Backend", "CallerBusy", "CallerLimits", "BlobStore", "GenerationEngine", "IdempotencyConflict", "Lease", "QueueFull", "TaskIntake", "TaskQueue", "TaskStore", "TaskRecord", "TaskResult", "WebhookDue",
           "FailureReason", "StoredRequestInvalid",
           "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "STATUSES", "TERMINAL"]
