"""Task submission and the stored result shape, shared by the API and the worker."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

from .ports import Backend, QueueFull, TaskRecord


@dataclass
class Upload:
    """A client-supplied audio file (multipart or a pre-uploaded key)."""
    data: bytes
    filename: str = ""
    content_type: str = "application/octet-stream"


def upload_key(task_id: str, role: str, filename: str) -> str:
    ext = ""
    if "." in filename:
        ext = "." + filename.rsplit(".", 1)[1].lower()[:8]
        if not ext[1:].isalnum():
            ext = ""
    return f"uploads/{task_id}/{role}{ext}"


def output_key(task_id: str, attempt: int, index: int, fmt: str) -> str:
    # The attempt is part of the key so a fenced-out duplicate worker never overwrites the
    # files of the attempt that won.
    return f"outputs/{task_id}/{attempt}-{index}.{fmt}"


def submit_task(backend: Backend, request: dict, max_queue: int,
                uploads: Optional[dict[str, Upload]] = None,
                task_id: Optional[str] = None) -> tuple[str, Optional[int]]:
    """Store uploads, create the task and enqueue it, all or nothing.

    `request` is a GenerationRequest dump; `uploads` maps "src_audio"/"reference_audio" to files,
    whose blob keys are written into the request as src_audio_key / reference_audio_key.
    Raises QueueFull (the API's 429) after undoing everything it created.
    """
    task_id = task_id or str(uuid.uuid4())
    request = dict(request)
    keys: list[str] = []
    try:
        for role, up in (uploads or {}).items():
            key = upload_key(task_id, role, up.filename)
            backend.blobs.put(key, up.data, up.content_type)
            keys.append(key)
            request[f"{role}_key"] = key
        for role in ("src_audio", "reference_audio"):
            k = request.get(f"{role}_key")
            if k and k not in keys:
                keys.append(k)  # a pre-uploaded key now belongs to this task
        backend.store.create(TaskRecord(task_id=task_id, request=request, blob_keys=keys))
        try:
            backend.queue.enqueue(task_id, max_queue)
        except BaseException:
            backend.store.delete(task_id)
            raise
    except BaseException:
        for key in keys:
            if key.startswith(f"uploads/{task_id}/"):
                backend.blobs.delete(key)
        raise
    return task_id, backend.store.queue_position(task_id)


__all__ = ["Upload", "submit_task", "upload_key", "output_key", "QueueFull"]
