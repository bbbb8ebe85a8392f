"""TaskIntake on SQLite: the task row and its queue entry are written in one transaction."""
from __future__ import annotations

from ..idempotency import replayed
from typing import Optional

from ..ports import QUEUED, RUNNING, CallerLimits, TaskIntake, TaskRecord
from ..caller_limits import check_caller
from ..lanes import is_interactive
from .db import Database
from .queue import SqliteTaskQueue
from .store import insert_task, record_from_row


class SqliteTaskIntake(TaskIntake):
    def __init__(self, db: Database, queue: SqliteTaskQueue):
        self.db, self.queue = db, queue

    def submit(self, record: TaskRecord, max_queue: int,
               caller_limits: Optional[CallerLimits] = None) -> tuple[TaskRecord, bool]:
        with self.db.write() as c:
            if record.idempotency_key:
                row = c.execute("SELECT * FROM tasks WHERE idempotency_key = ?",
                                (record.idempotency_key,)).fetchone()
                if row is not None:
                    return replayed(record, record_from_row(row)), False
            if record.owner and caller_limits is not None:  # counted inside the write lock: exact
                counts = dict(c.execute("SELECT status, COUNT(*) FROM tasks WHERE owner = ? AND status IN (?, ?)"
                                        " GROUP BY status", (record.owner, QUEUED, RUNNING)).fetchall())
                check_caller(counts.get(QUEUED, 0), counts.get(RUNNING, 0), caller_limits)
            insert_task(c, record)
            # QueueFull rolls back the insert too
            self.queue.insert(c, record.task_id, max_queue, interactive=is_interactive(record.request))
        self.queue.notify()
        return record, True

