"""DynamoDB's 400 KB item limit, kept inside the AWS adapter: large result parts spill to S3.

A task item holds its request (at most 64 KB as stored, service/task_limits.py) beside its result.
A result larger than MAX_RESULT_BYTES as stored moves its largest parts (generation_info, metas) to
`outputs/<task>/<attempt>-<part>.json`; the item keeps the rest and a map part -> key. Reading the
item puts the parts back, so every reader gets the whole result. A part that cannot be read back is
replaced by what the item kept and named in `generation_info["missing_parts"]` and its notes, never
an error: a poll must not turn into a 500 because one object expired or S3 hiccuped.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from ..blob_keys import result_part_key
from ..ports import BlobStore
from ..records import TaskResult

log = logging.getLogger(__name__)

MAX_RESULT_BYTES = 128 * 1024  # a result as stored; request + result + the rest stay far below 400 KB
MOVABLE_PARTS = ("generation_info", "metas")
_KEPT_INFO = ("random_weights", "test_engine")  # small flags readers need even when the part is gone


@dataclass(frozen=True)
class Spilled:
    """A result as the item holds it: its JSON and the S3 keys of the parts moved out of it."""

    stored_json: str
    parts: dict[str, str]


def spill(result: TaskResult, task_id: str, attempt: int, blobs: Optional[BlobStore]) -> Spilled:
    """Write the parts that do not fit to S3 (largest first, until the rest fits)."""
    stored = result.model_dump(mode="json")
    if _size(stored) <= MAX_RESULT_BYTES:
        return Spilled(_json(stored), {})
    if blobs is None:
        raise RuntimeError(f"a {_size(stored):,}-byte result needs a blob store to spill to")
    parts: dict[str, str] = {}
    try:
        for part in sorted(MOVABLE_PARTS, key=lambda p: -_size(stored[p])):
            if _size(stored) <= MAX_RESULT_BYTES:
                break
            key = result_part_key(task_id, attempt, part)
            blobs.put(key, _json(stored[part]).encode(), "application/json")
            parts[part] = key
            info = stored["generation_info"]
            stored[part] = {k: info[k] for k in _KEPT_INFO if k in info} if part == "generation_info" else {}
    except Exception:
        discard(parts, blobs)
        raise
    return Spilled(_json(stored), parts)


def discard(parts: dict[str, str], blobs: Optional[BlobStore]) -> None:
    """Remove spilled parts whose item write did not happen."""
    for key in parts.values():
        try:
            if blobs is not None:
                blobs.delete(key)
        except Exception as exc:  # the expiry sweep finds what is left
            log.warning("could not remove the result part %s: %s", key, exc)


def restore(stored_json: str, parts: dict[str, str], blobs: Optional[BlobStore]) -> TaskResult:
    """The whole result: the item's JSON with its spilled parts read back."""
    stored: dict[str, Any] = json.loads(stored_json)
    # Items written before the adapter owned the spill kept the map inside the result.
    parts = {**(stored.pop("moved", None) or {}), **parts}
    missing: list[str] = []
    notes: list[str] = []
    for part, key in parts.items():
        try:
            if blobs is None:
                raise RuntimeError("this store has no blob store")
            stored[part] = _read_part(blobs, key)
        except KeyError:
            missing.append(part)
            notes.append(f"{part} is missing: it was stored apart from the task record and is gone (expired?)")
        except Exception as exc:
            log.warning("could not read %s of a result (%s): %s", part, key, exc)
            missing.append(part)
            notes.append(f"{part} is missing: it was stored apart from the task record and could not be read")
    if missing:
        info = dict(stored.get("generation_info") or {})
        info["missing_parts"] = missing
        info["notes"] = [*info.get("notes", []), *notes]
        stored["generation_info"] = info
    return TaskResult.model_validate(stored)


def _read_part(blobs: BlobStore, key: str) -> dict[str, Any]:
    value = json.loads(blobs.get(key))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _size(value: Any) -> int:
    return len(_json(value).encode())


__all__ = ["MAX_RESULT_BYTES", "MOVABLE_PARTS", "Spilled", "discard", "restore", "spill"]
