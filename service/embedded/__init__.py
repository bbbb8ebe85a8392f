"""Embedded backend: SQLite (WAL) task store and queue, audio files under the data dir."""
from __future__ import annotations

import os

from ..config import Settings
from ..ports import Backend
from .db import Database
from .files import FileBlobStore
from .queue import SqliteTaskQueue
from .store import SqliteTaskStore


def make_embedded_backend(settings: Settings) -> Backend:
    data_dir = os.path.abspath(settings.data_dir)
    db = Database(os.path.join(data_dir, "acestep.db"))
    store = SqliteTaskStore(db)

    def dead_letter(task_id: str, receive_count: int) -> None:
        store.fail_unfinished(
            task_id,
            f"abandoned after {receive_count} deliveries: the worker running it stopped "
            "(crashed, was killed or ran out of memory) each time",
        )

    queue = SqliteTaskQueue(db, max_receives=settings.max_receives, on_dead_letter=dead_letter)
    return Backend(store=store, queue=queue, blobs=FileBlobStore(os.path.join(data_dir, "blobs")),
                   name="embedded")
