"""TaskQueue on SQLite: leases with a visibility timeout, redelivery and dead-lettering.

Waiting for work never takes the write lock: an idle receiver watches `PRAGMA data_version`
(which moves when any other connection commits, in this process or another) every POLL_SECONDS,
and reads the queue only when it moved, when the next lease falls due, or every
FALLBACK_SECONDS. A receiver in the submitting process is also woken at once by a condition
variable. The write lock is taken only when a task is visible.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from typing import Callable, Optional

from ..ports import Lease, QueueFull, TaskQueue
from .db import Database

POLL_SECONDS = 0.005  # data_version checks: a read of the WAL index, no lock and no table access
FALLBACK_SECONDS = 1.0  # re-read the queue at least this often whatever data_version says
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
    def insert(c: sqlite3.Connection, task_id: str, max_size: int, interactive: bool = False) -> None:
        """Enqueue inside the caller's write transaction (the intake adds the task row in the same one).
        `interactive`: the task is received before every generation waiting (service/lanes.py)."""
        now = time.time()
        waiting = c.execute("SELECT COUNT(*) FROM queue WHERE visible_at <= ?", (now,)).fetchone()[0]
        if waiting >= max_size:
            raise QueueFull(f"{waiting} tasks waiting (max {max_size})")
        c.execute("INSERT INTO queue (task_id, visible_at, lane) VALUES (?, ?, ?)", (task_id, now, int(interactive)))

    def _take(self, visibility_timeout: float, interactive_only: bool = False) -> Optional[Lease]:
        dead: list[tuple[str, int]] = []
        lease = None
        with self.db.write() as c:
            while True:
                now = time.time()
                row = c.execute(
                    "SELECT q.seq, q.task_id, q.receive_count, COALESCE(t.attempt - t.given_back, 0) AS runs FROM queue q"
                    " LEFT JOIN tasks t ON t.task_id = q.task_id WHERE q.visible_at <= ? AND q.lane >= ?"
                    " ORDER BY q.lane DESC, q.seq LIMIT 1", (now, int(interactive_only))).fetchone()
                if row is None:
                    break
                # Only deliveries that ran count (the task's attempt: one per claim, less the claims a
                # stopping worker handed back): a task a worker held for its next batch, received just
                # before dying, or gave back at shutdown, has not hurt anyone.
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

    def _next_visible_in(self) -> Optional[float]:
        """Seconds until the first queued task is visible (<= 0: now); None when the queue is empty."""
        row = self.db.read().execute("SELECT MIN(visible_at) FROM queue").fetchone()
        return None if row[0] is None else float(row[0]) - time.time()

    def receive(self, wait_seconds: float, visibility_timeout: float) -> Optional[Lease]:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            version = self.db.data_version()
            due_in = self._next_visible_in()
            if due_in is not None and due_in <= 0:
                lease = self._take(visibility_timeout)
                if lease is not None:
                    return lease
                continue  # another receiver took it (or it was dead-lettered): look again
            now = time.monotonic()
            if now >= deadline:
                return None
            wake_at = min(deadline, now + FALLBACK_SECONDS, now + due_in if due_in is not None else deadline)
            self._wait_for_change(version, wake_at)

    def receive_interactive(self, visibility_timeout: float) -> Optional[Lease]:
        return self._take(visibility_timeout, interactive_only=True)

    def _wait_for_change(self, version: int, until: float) -> None:
        """Until a commit by another connection, a notify from this process, or `until` (monotonic)."""
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            with self._cond:
                if self._cond.wait(min(remaining, POLL_SECONDS)):
                    return
            if self.db.data_version() != version:
                return

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
