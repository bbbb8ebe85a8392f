"""Read-change-write of one meta record (the uploaded adapters' index, the fleet's default adapters) that
cannot lose a concurrent writer's change: the write is conditional on the version read (TaskStore.put_meta_if:
SQLite compares it inside its write transaction, DynamoDB in a ConditionExpression); a writer that lost reads
the record again and redoes its change on what the other one wrote.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from .ports import TaskStore
from .refusals import AdapterConflict

T = TypeVar("T")
ATTEMPTS = 20  # each lost race means another writer landed; this many in a row is a storm, not bad luck


def update_meta(store: TaskStore, key: str,
                change: Callable[[Optional[dict[str, Any]]], tuple[Optional[dict[str, Any]], T]]) -> T:
    """Applies `change` (current value -> (new value or None for no write, answer)) until its write lands
    on the version it read; returns its answer. `change` may raise (a refusal) to write nothing."""
    for _ in range(ATTEMPTS):
        current, version = store.get_meta_versioned(key)
        value, answer = change(current)
        if value is None or store.put_meta_if(key, value, version):
            return answer
    raise AdapterConflict(f"{key}: changed by other requests {ATTEMPTS} times in a row; try again")


__all__ = ["update_meta"]
