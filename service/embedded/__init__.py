"""Embedded backend: SQLite (WAL) task store and queue, audio files under the data dir."""
from __future__ import annotations

import os
import time

from ..blob_keys import PENDING_UPLOADS_PREFIX
from ..config import Settings
from ..ports import Backend, FailureReason
from ..signing_keys import CachedKeys
from ..storage_errors import has_room
from ..upload_quota import PENDING_UPLOAD_SECONDS
from .db import Database
from .orphans import ORPHAN_OUTPUT_SECONDS, collect_orphan_outputs, collect_orphan_uploads
from .signing_secret import WEBHOOK_FILE_NAME, FileSigningSecret
from .files import FileBlobStore
from .intake import SqliteTaskIntake
from .queue import SqliteTaskQueue
from .store import SqliteTaskStore


def make_embedded_backend(settings: Settings) -> Backend:
    data_dir = os.path.abspath(settings.data_dir)
    db = Database(os.path.join(data_dir, "acestep.db"))
    store = SqliteTaskStore(db)

    def dead_letter(task_id: str, receive_count: int) -> None:
        if store.fail_unfinished(
                task_id,
                f"abandoned after {receive_count} deliveries: the worker running it stopped "
                "(crashed, was killed or ran out of memory) each time", FailureReason.DEAD_LETTERED):
            backend.task_ended(task_id)  # the conditional write above is true once: one webhook

    queue = SqliteTaskQueue(db, max_receives=settings.max_receives, on_dead_letter=dead_letter)
    blobs = FileBlobStore(os.path.join(data_dir, "blobs"))

    def sweep_expired() -> int:
        """Results are kept ACESTEP_TASK_TTL_DAYS; direct uploads no task uses, an hour (upload_quota.py)."""
        now = time.time()
        removed = 0
        expired = store.delete_finished_before(now - settings.task_ttl_days * 86400)
        # A direct upload that a waiting task refers to is not abandoned, however old it is, nor
        # deleted with an expired task that shared it.
        in_use = frozenset(store.unfinished_blob_keys())
        for record in expired:
            for key in record.blob_keys:
                if key not in in_use:
                    blobs.delete(key)
            removed += 1
        removed += blobs.delete_older_than(PENDING_UPLOADS_PREFIX, now - PENDING_UPLOAD_SECONDS, keep=in_use)
        removed += collect_orphan_uploads(store, blobs, now - ORPHAN_OUTPUT_SECONDS)
        return removed + collect_orphan_outputs(store, blobs, now - ORPHAN_OUTPUT_SECONDS)

    backend = Backend(store=store, queue=queue, blobs=blobs, intake=SqliteTaskIntake(db, queue), name="embedded",
                      sweep_expired=sweep_expired, signing_keys=CachedKeys(FileSigningSecret(data_dir).load),
                      webhook_keys=CachedKeys(FileSigningSecret(data_dir, file_name=WEBHOOK_FILE_NAME).load),
                      has_room=lambda: has_room(data_dir, settings.min_free_mb * 1024 * 1024))
    return backend
