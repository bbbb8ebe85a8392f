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


@dataclass(frozen=True)
class PlacedSources:
    """A task's sources where the task keeps them: its request with every role's final key, the files
    to write under those keys and the direct uploads to copy there."""
    request: GenerationRequest
    writes: dict[str, Upload]  # final key -> a file sent with the submit
    copies: dict[str, str]  # final key -> the direct upload (pending key) it copies


def new_task_id() -> str:
    return str(uuid.uuid4())


def place_sources(task_id: str, request: GenerationRequest,
                  uploads: Optional[dict[str, Upload]] = None) -> PlacedSources:
    """The one place a task's source keys are decided. A file sent with the submit goes under the task's
    own key; so does a copy of a direct upload (`<role>_key` a pending key): a direct upload expires on
    its own clock (the embedded sweep, S3's lifecycle rule), and other tasks may share it. Any other key
    the request names stays as it is."""
    keys: dict[str, str] = {}
    writes: dict[str, Upload] = {}
    copies: dict[str, str] = {}
    for role in SOURCE_ROLES:
        up = (uploads or {}).get(role)
        sent = getattr(request, f"{role}_key")
        if up is not None:
            keys[role] = blob_keys.task_upload_key(task_id, role, up.filename)
            writes[keys[role]] = up
        elif sent and blob_keys.is_pending_upload_key(sent):
            keys[role] = blob_keys.task_upload_key(task_id, role, sent.rsplit("/", 1)[-1])
            copies[keys[role]] = sent
    placed = request.model_copy(update={f"{role}_key": key for role, key in keys.items()}) if keys else request
    return PlacedSources(placed, writes, copies)


def submit_task(backend: Backend, request: GenerationRequest, max_queue: int,
                uploads: Optional[dict[str, Upload]] = None,
                task_id: Optional[str] = None,
                idempotency_key: Optional[str] = None,
                webhook_url: Optional[str] = None, owner: Optional[str] = None,
                caller_limits: Optional[CallerLimits] = None) -> tuple[str, Optional[int]]:
    """Returns (task_id, queue_position). Raises QueueFull (the API's 429) after undoing everything.

    `request` is validated; `uploads` maps a role in SOURCE_ROLES to its file. This writes and copies
    the source blobs under the keys place_sources decides for `task_id` (the request as stored names
    them). With `idempotency_key`, a retry of an earlier submit returns that task and stores nothing
    (IdempotencyConflict if the request differs). `webhook_url` (checked by the caller,
    service/webhooks.py) gets the final result.
    """
    uploads = uploads or {}
    record = TaskRecord(task_id=task_id or new_task_id(), request=request,
                        idempotency_key=scoped_key(owner, idempotency_key) if idempotency_key else None,
                        webhook_url=webhook_url or None, owner=owner)
    if record.idempotency_key:
        record.request_digest = request_digest(
            request.model_dump(), {role: hashlib.sha256(up.data).hexdigest() for role, up in uploads.items()})
        first = backend.store.find_by_idempotency_key(record.idempotency_key)
        if first is not None:  # the common retry: answer without writing the uploads again
            return replayed(record, first).task_id, _position(backend, first.task_id)
    placed = place_sources(record.task_id, request, uploads)
    written: list[str] = []
    try:
        for key, up in placed.writes.items():
            backend.blobs.put(key, up.data, up.content_type)
            written.append(key)
        for own, pending in placed.copies.items():
            backend.blobs.copy(pending, own)
            written.append(own)
        record.request = placed.request
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


__all__ = ["PlacedSources", "Upload", "new_task_id", "place_sources", "submit_task", "QueueFull", "SOURCE_ROLES"]
