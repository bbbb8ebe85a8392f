"""Task submission: store the task's uploads, create its record and enqueue it, all or nothing."""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Optional

from engine.request import GenerationRequest

from . import blob_keys
from .idempotency import replayed, request_digest, scoped_key
from .observability.logs import log_context
from .ports import Backend, CallerLimits, QueueFull, TaskRecord

log = logging.getLogger(__name__)

SOURCE_ROLES = ("src_audio", "reference_audio")


@dataclass
class Upload:
    """A client-supplied audio file (multipart, or a server file read on its behalf)."""
    data: bytes
    filename: str = ""
    content_type: str = "application/octet-stream"


def submit_task(backend: Backend, request: GenerationRequest, max_queue: int,
                uploads: Optional[dict[str, Upload]] = None,
                task_id: Optional[str] = None,
                idempotency_key: Optional[str] = None,
                webhook_url: Optional[str] = None, owner: Optional[str] = None,
                caller_limits: Optional[CallerLimits] = None) -> tuple[str, Optional[int]]:
    """Returns (task_id, queue_position). Raises QueueFull (the API's 429) after undoing everything.

    `request` is validated; `uploads` maps a role in SOURCE_ROLES to its file, whose
    blob key this writes into the request as `<role>_key`. A `<role>_key` already in the request
    (a direct upload) becomes the task's. With `idempotency_key`, a retry of an earlier submit
    returns that task and stores nothing (IdempotencyConflict if the request differs). `webhook_url`
    (checked by the caller, service/webhooks.py) gets the final result.
    """
    uploads = uploads or {}
    record = TaskRecord(task_id=task_id or str(uuid.uuid4()), request=request,
                        idempotency_key=scoped_key(owner, idempotency_key) if idempotency_key else None,
                        webhook_url=webhook_url or None, owner=owner)
    if record.idempotency_key:
        record.request_digest = request_digest(
            request.model_dump(), {role: hashlib.sha256(up.data).hexdigest() for role, up in uploads.items()})
        first = backend.store.find_by_idempotency_key(record.idempotency_key)
        if first is not None:  # the common retry: answer without writing the uploads again
            return replayed(record, first).task_id, _position(backend, first.task_id)
    written: list[str] = []
    try:
        for role, up in uploads.items():
            key = blob_keys.task_upload_key(record.task_id, role, up.filename)
            backend.blobs.put(key, up.data, up.content_type)
            written.append(key)
            record.request = record.request.model_copy(update={f"{role}_key": key})
        for role in SOURCE_ROLES:
            key = getattr(record.request, f"{role}_key")
            if key and blob_keys.is_pending_upload_key(key):
                # The task keeps its own copy: a direct upload expires on its own clock (the embedded
                # sweep, S3's lifecycle rule), and other tasks may share it.
                own = blob_keys.task_upload_key(record.task_id, role, key.rsplit("/", 1)[-1])
                backend.blobs.copy(key, own)
                written.append(own)
                record.request = record.request.model_copy(update={f"{role}_key": own})
        record.blob_keys = [key for role in SOURCE_ROLES if (key := getattr(record.request, f"{role}_key"))]
        task, created = backend.intake.submit(record, max_queue, caller_limits)
    except BaseException:
        _delete(backend, written)
        raise
    if not created:  # a concurrent retry won the race: ours is not needed
        _delete(backend, written)
    position = _position(backend, task.task_id)
    with log_context(task_id=task.task_id):
        log.info("task %s %s (queue position %s)", task.task_id, "queued" if created else "re-submitted", position)
    return task.task_id, position


def _position(backend: Backend, task_id: str) -> Optional[int]:
    return backend.store.queue_positions([task_id]).get(task_id)


def _delete(backend: Backend, keys: list[str]) -> None:
    for key in keys:
        backend.blobs.delete(key)


__all__ = ["Upload", "submit_task", "QueueFull", "SOURCE_ROLES"]
