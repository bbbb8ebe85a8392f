"""Files no task owns, which the embedded sweep deletes. Output files written by an attempt whose
worker died (or was fenced out) before its result was recorded: the task finished with another
attempt's files, or never, and nothing refers to these. Upload folders (uploads/<task_id>/) of a
submit that died after storing its files and before recording its task. (On AWS the S3 lifecycle
rules on outputs/ and uploads/ expire every file after the retention period, orphans included.)
"""
from __future__ import annotations

from ..blob_keys import OUTPUTS_PREFIX, PENDING_UPLOADS_PREFIX, UPLOADS_PREFIX, parse_output_key, parse_result_part_key
from ..records import TERMINAL
from .files import FileBlobStore
from .store import SqliteTaskStore

# Old enough that no live attempt is still between writing its files and recording its result.
ORPHAN_OUTPUT_SECONDS = 3600


def collect_orphan_outputs(store: SqliteTaskStore, blobs: FileBlobStore, cutoff: float) -> int:
    """Delete output files written before `cutoff` that no finished task lists; returns how many."""
    by_task: dict[str, list[str]] = {}
    for key in blobs.keys_older_than(OUTPUTS_PREFIX, cutoff):
        parsed = parse_output_key(key) or parse_result_part_key(key)
        if parsed is not None:
            by_task.setdefault(parsed.task_id, []).append(key)
    records = store.get_many(list(by_task))
    removed = 0
    for task_id, keys in by_task.items():
        record = records.get(task_id)
        if record is not None and record.status not in TERMINAL:
            continue  # its current attempt may still record these
        owned = set(record.blob_keys) if record is not None else set()
        for key in keys:
            if key not in owned:
                blobs.delete(key)
                removed += 1
    return removed


def collect_orphan_uploads(store: SqliteTaskStore, blobs: FileBlobStore, cutoff: float) -> int:
    """Delete task upload files written before `cutoff` whose task does not exist; returns how many.
    (A task's own uploads go with its record when it expires; direct uploads are swept apart.)"""
    by_task: dict[str, list[str]] = {}
    for key in blobs.keys_older_than(UPLOADS_PREFIX, cutoff):
        if not key.startswith(PENDING_UPLOADS_PREFIX):
            by_task.setdefault(key[len(UPLOADS_PREFIX):].split("/", 1)[0], []).append(key)
    known = store.get_many(list(by_task))
    removed = 0
    for task_id, keys in by_task.items():
        if task_id not in known:
            for key in keys:
                blobs.delete(key)
                removed += 1
            blobs.remove_empty_folder(f"{UPLOADS_PREFIX}{task_id}/")
    return removed
