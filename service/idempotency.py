"""Idempotent submission: a retried submit with the same Idempotency-Key returns the first task.

The key alone is not enough: a client that reuses a key for a different request gets an error
instead of someone else's result, so each task keeps a digest of what was asked.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, Optional

from .ports import IdempotencyConflict, TaskRecord


def request_digest(request: dict, upload_digests: Optional[Mapping[str, str]] = None) -> str:
    """SHA-256 over the validated request and the content of its uploaded files."""
    canonical = json.dumps({"request": request, "uploads": dict(sorted((upload_digests or {}).items()))},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def replayed(new: TaskRecord, first: TaskRecord) -> TaskRecord:
    """The first task, for a true retry of it; IdempotencyConflict for a different request."""
    if first.request_digest != new.request_digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {new.idempotency_key!r} was already used for task {first.task_id} "
            "with a different request; use a new key for a new request")
    return first
