"""Results too large for a task record keep their largest parts in the blob store.

A task record holds its request (at most 64 KB as stored, service/task_limits.py) beside its
result, and a DynamoDB item is at most 400 KB. A result larger than MAX_RESULT_BYTES as stored
moves its largest parts (generation_info, metas) to `outputs/<task>/<attempt>-<part>.json` and
records their keys in `TaskResult.moved`; readers put them back with `with_moved_parts`, so
clients get the same shape as for a small result. A part that cannot be read back is replaced by
what the record kept and named in `generation_info["missing_parts"]` and its notes, never an error.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from .blob_keys import result_part_key
from .ports import BlobStore
from .records import TaskRecord, TaskResult

log = logging.getLogger(__name__)

MAX_RESULT_BYTES = 128 * 1024  # a result as stored; request + result + the rest stay far below 400 KB
MOVABLE_PARTS = ("generation_info", "metas")
_KEPT_INFO = ("random_weights", "test_engine")  # small flags readers need even when the part is gone


def stored_size(result: TaskResult) -> int:
    return len(result.model_dump_json().encode())


def move_large_parts(result: TaskResult, task_id: str, attempt: int,
                     blobs: BlobStore) -> tuple[TaskResult, list[str]]:
    """The result to store in the record, and the blob keys of the parts written beside it."""
    if stored_size(result) <= MAX_RESULT_BYTES:
        return result, []
    stored = result.model_copy(deep=True)
    keys: list[str] = []
    largest_first = sorted(MOVABLE_PARTS, key=lambda p: -len(json.dumps(getattr(result, p), ensure_ascii=False)))
    for part in largest_first:
        if stored_size(stored) <= MAX_RESULT_BYTES:
            break
        key = result_part_key(task_id, attempt, part)
        blobs.put(key, json.dumps(getattr(result, part), ensure_ascii=False).encode(), "application/json")
        keys.append(key)
        stored.moved[part] = key
        kept = {k: result.generation_info[k] for k in _KEPT_INFO if k in result.generation_info}
        setattr(stored, part, kept if part == "generation_info" else {})
    return stored, keys


def _read_part(blobs: BlobStore, key: str) -> dict[str, Any]:
    value = json.loads(blobs.get(key))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def with_moved_parts(result: TaskResult, blobs: BlobStore) -> tuple[TaskResult, list[str]]:
    """The whole result (moved parts read back), and the names of parts that could not be read."""
    if not result.moved:
        return result, []
    whole = result.model_copy(deep=True)
    whole.moved = {}
    missing: list[str] = []
    notes: list[str] = []
    for part, key in result.moved.items():
        try:
            setattr(whole, part, _read_part(blobs, key))
        except KeyError:
            missing.append(part)
            notes.append(f"{part} is missing: it was stored apart from the task record and is gone (expired?)")
        except Exception as exc:  # a storage outage or a damaged file must not turn a poll into a 500
            log.warning("could not read %s of a result (%s): %s", part, key, exc)
            missing.append(part)
            notes.append(f"{part} is missing: it was stored apart from the task record and could not be read")
    if missing:
        info = dict(whole.generation_info)
        info["missing_parts"] = missing
        info["notes"] = [*info.get("notes", []), *notes]
        whole.generation_info = info
    return whole, missing


def with_whole_result(record: TaskRecord, blobs: BlobStore) -> tuple[TaskRecord, list[str]]:
    """The record with its result's moved parts read back (blocking: reads the blob store)."""
    if record.result is None or not record.result.moved:
        return record, []
    result, missing = with_moved_parts(record.result, blobs)
    return replace(record, result=result), missing


__all__ = ["MAX_RESULT_BYTES", "MOVABLE_PARTS", "move_large_parts", "stored_size", "with_moved_parts",
           "with_whole_result"]
