"""Idempotent submission: a retried submit with the same Idempotency-Key returns the first task.

The key alone is not enough: a client that reuses a key for a different request gets an error
instead of someone else's result, so each task keeps a digest of what was asked. Keys are the
caller's own: stored scoped by the task's owner, so one caller's key never finds (or names)
another caller's task.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

from .ports import IdempotencyConflict, TaskRecord


def request_digest(request: dict[str, Any], upload_digests: Optional[Mapping[str, str]] = None) -> str:
    """SHA-256 over the validated request and the content of its uploaded files."""
    canonical = json.dumps({"request": request, "uploads": dict(sorted((upload_digests or {}).items()))},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


_SCOPE = "\t"  # never in a client's key (printable ASCII only) nor in a caller id


def scoped_key(owner: Optional[str], key: str) -> str:
    """The key as stored: `key` within its caller's namespace (as is for a task without an owner)."""
    return f"{owner}{_SCOPE}{key}" if owner else key


def client_key(stored: str) -> str:
    """The key as the client sent it."""
    return stored.rsplit(_SCOPE, 1)[-1]


def replayed(new: TaskRecord, first: TaskRecord) -> TaskRecord:
    """The first task, for a true retry of it; IdempotencyConflict for a different request."""
    if first.request_digest != new.request_digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {client_key(new.idempotency_key or '')!r} was already used for task {first.task_id} "
            "with a different request; use a new key for a new request")
    return first
