"""Task submission: store the task's uploads, create its record and enqueue it, all or nothing."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

from . import blob_keys
from .ports import Backend, QueueFull, TaskRecord

SOURCE_ROLES = ("src_audio", "reference_audio")


@dataclass
class Upload:
    """A client-supplied audio file (multipart, or a server file read on its behalf)."""
    data: bytes
    filename: str = ""
    content_type: str = "application/octet-stream"


def submit_task(backend: Backend, request: dict, max_queue: int,
                uploads: Optional[dict[str, Upload]] = None,
                task_id: Optional[str] = None) -> tuple[str, Optional[int]]:
    """Returns (task_id, queue_position). Raises QueueFull (the API's 429) after undoing everything.

    `request` is a GenerationRequest dump; `uploads` maps a role in SOURCE_ROLES to its file, whose
    blob key this writes into the request as `<role>_key`. A `<role>_key` already in the request
    (a direct upload) becomes the task's.
    """
    task_id = task_id or str(uuid.uuid4())
    request = dict(request)
    keys: list[str] = []
    try:
        for role, up in (uploads or {}).items():
            key = blob_keys.task_upload_key(task_id, role, up.filename)
            backend.blobs.put(key, up.data, up.content_type)
            keys.append(key)
            request[f"{role}_key"] = key
        for role in SOURCE_ROLES:
            k = request.get(f"{role}_key")
            if k and k not in keys:
                keys.append(k)
        backend.store.create(TaskRecord(task_id=task_id, request=request, blob_keys=keys))
        try:
            backend.queue.enqueue(task_id, max_queue)
        except BaseException:
            backend.store.delete(task_id)
            raise
    except BaseException:
        for key in keys:
            if blob_keys.is_task_upload(task_id, key):
                backend.blobs.delete(key)
        raise
    return task_id, backend.store.queue_position(task_id)


__all__ = ["Upload", "submit_task", "QueueFull", "SOURCE_ROLES"]
