"""TaskQueue on SQLite: leases with a visibility timeout, redelivery and dead-lettering.

Waiting for work: a receiver in the same process is woken at once by a condition variable; a
receiver in another process (a separate `acestep-worker`) re-checks the table every
POLL_SECONDS, which is a single indexed read. Either way an idle worker picks up a new task well
within 50 ms.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Callable, Optional

from ..ports import Lease, QueueFull, TaskQueue
from .db import Database

POLL_SECONDS = 0.02
RECEIVE_BACKSTOP = 10

# One condition per database file, so enqueues wake receivers of the same process.
_conditions: dict[str, threading.Condition] = {}
_conditions_lock = threading.Lock()


def _condition_for(path: str) -> threading.Condition:
    with _conditions_lock:
        return _conditions.setdefault(path, threading.Condition())


class SqliteTaskQueue(TaskQueue):
    def __init__(self, db: Database, max_receives: int = 3,
                 on_dead_letter: Optional[Callable[[str, int], None]] = None):
        self.db = db
        self.max_receives = max_receives
        self.on_dead_letter = on_dead_letter
        self._cond = _condition_for(db.path)

    def notify(self) -> None:
        """Wake receivers in this process (others poll)."""
        with self._cond:
            self._cond.notify_all()

    def enqueue(self, task_id: str, max_size: int) -> None:
        with self.db.write() as c:
            self.insert(c, task_id, max_size)
        self.notify()

    @staticmethod
    def insert(c, task_id: str, max_size: int) -> None:
        """Enqueue inside the caller's write transaction (the intake adds the task row in the same one)."""
        now = time.time()
        waiting = c.execute("SELECT COUNT(*) FROM queue WHERE visible_at <= ?", (now,)).fetchone()[0]
        if waiting >= max_size:
            raise QueueFull(f"{waiting} tasks waiting (max {max_size})")
        c.execute("INSERT INTO queue (task_id, visible_at) VALUES (?, ?)", (task_id, now))

    def _take(self, visibility_timeout: float) -> Optional[Lease]:
        dead: list[tuple[str, int]] = []
        lease = None
        with self.db.write() as c:
            while True:
                now = time.time()
                row = c.execute(
                    "SELECT q.seq, q.task_id, q.receive_count, COALESCE(t.attempt, 0) AS runs FROM queue q"
                    " LEFT JOIN tasks t ON t.task_id = q.task_id WHERE q.visible_at <= ?"
                    " ORDER BY q.seq LIMIT 1", (now,)).fetchone()
                if row is None:
                    break
                # Only deliveries that ran count (the task's attempt: one per claim): a task a worker
                # held for its next batch, or received just before dying, has not hurt anyone.
                # The receive count is a backstop against a message no worker ever manages to claim.
                if row["runs"] >= self.max_receives or row["receive_count"] >= RECEIVE_BACKSTOP * self.max_receives:
                    c.execute("DELETE FROM queue WHERE seq = ?", (row["seq"],))
                    dead.append((row["task_id"], row["runs"] or row["receive_count"]))
                    continue
                receipt = uuid.uuid4().hex
                c.execute(
                    "UPDATE queue SET visible_at = ?, receive_count = receive_count + 1, receipt = ?"
                    " WHERE seq = ?", (now + visibility_timeout, receipt, row["seq"]))
                lease = Lease(task_id=row["task_id"], receipt=receipt,
                              receive_count=row["receive_count"] + 1)
                break
        for task_id, count in dead:
            if self.on_dead_letter:
                self.on_dead_letter(task_id, count)
        return lease

    def receive(self, wait_seconds: float, visibility_timeout: float) -> Optional[Lease]:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            lease = self._take(visibility_timeout)
            if lease is not None:
                return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._cond:
                self._cond.wait(min(remaining, POLL_SECONDS))

    def extend(self, lease: Lease, visibility_timeout: float) -> None:
        with self.db.write() as c:
            c.execute("UPDATE queue SET visible_at = ? WHERE task_id = ? AND receipt = ?",
                      (time.time() + visibility_timeout, lease.task_id, lease.receipt))

    def ack(self, lease: Lease) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM queue WHERE task_id = ? AND receipt = ?", (lease.task_id, lease.receipt))

    def release(self, lease: Lease) -> None:
        with self.db.write() as c:
            # A deliberate give-back is not a failed delivery: it does not count toward dead-lettering.
            c.execute("UPDATE queue SET visible_at = ?, receipt = NULL, receive_count = MAX(receive_count - 1, 0)"
                      " WHERE task_id = ? AND receipt = ?", (time.time(), lease.task_id, lease.receipt))
        self.notify()

    def size(self) -> int:
        return int(self.db.read().execute(
            "SELECT COUNT(*) FROM queue WHERE visible_at <= ?", (time.time(),)).fetchone()[0])
