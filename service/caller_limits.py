"""Per-caller limits on tasks in flight, and the caller identity they count by.

A caller is its API key (a digest, never the key) or, without a key, its address. Both backends
count inside the write that creates the task (SQLite's write lock; a conditional DynamoDB
transaction), so concurrent submits cannot overshoot.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .ports import CallerBusy, CallerLimits


@dataclass(frozen=True)
class Caller:
    """Who is calling, decided once per request (handlers/caller.py): the request rate and the limits on
    tasks in flight count by the same object. `id` is what a task records as its owner."""
    id: str

    @classmethod
    def by_key(cls, credential: str) -> "Caller":
        return cls("key:" + hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()[:24])

    @classmethod
    def at(cls, address: str | None) -> "Caller":
        return cls("ip:" + (address or "unknown"))


def check_caller(queued: int, running: int, limits: CallerLimits) -> None:
    if queued >= limits.max_queued:
        raise CallerBusy(f"you have {queued} tasks waiting; the limit per caller is {limits.max_queued} "
                         "(ACESTEP_CALLER_MAX_QUEUED)")
    if queued + running >= limits.max_active:
        raise CallerBusy(f"you have {queued + running} tasks waiting or running; the limit per caller is "
                         f"{limits.max_active} (ACESTEP_CALLER_MAX_ACTIVE)")
