"""One SQLite database file (WAL) shared by the embedded task store and queue.

Each thread gets its own connection; several processes (API, workers) share the file, and
SQLite's locking serialises their writes. `BEGIN IMMEDIATE` takes the write lock up front so
read-modify-write transitions cannot interleave.

Threads of one process queue on an in-process lock before `BEGIN IMMEDIATE`: left to SQLite, a
thread that finds the file locked sleeps in the busy handler with a growing back-off (tens of ms
each), so under concurrent submits most of the time went to sleeping while the lock was free.
Only writers of different processes still meet in SQLite's busy handler.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from typing import Iterator

from ..storage_errors import StorageFull, is_storage_full

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT 'queued',
    attempt INTEGER NOT NULL DEFAULT 0,
    given_back INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    result TEXT,
    error TEXT,
    reason TEXT,
    blob_keys TEXT NOT NULL DEFAULT '[]',
    idempotency_key TEXT,
    request_digest TEXT,
    webhook_url TEXT,
    owner TEXT,
    webhook_due REAL,
    webhook_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_status_seq ON tasks(status, seq);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at);
CREATE INDEX IF NOT EXISTS tasks_owner_status ON tasks(owner, status) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_webhook_due ON tasks(webhook_due) WHERE webhook_due IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    lane INTEGER NOT NULL DEFAULT 0  -- 1: interactive (service/lanes.py), received before any generation
);
CREATE INDEX IF NOT EXISTS queue_visible ON queue(visible_at, seq);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    beat_at REAL NOT NULL,
    beat TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0  -- moved on by every write (put_meta_if compares it)
);
"""


# One writer lock per database file and process (several Database objects may open one file).
_writer_locks: dict[str, threading.RLock] = {}
_writer_locks_guard = threading.Lock()


def _writer_lock(path: str) -> threading.RLock:
    with _writer_locks_guard:
        return _writer_locks.setdefault(os.path.realpath(path), threading.RLock())


class Database:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        self._write_lock = _writer_lock(path)
        self._watch: sqlite3.Connection | None = None  # change_token's connection
        self._watch_lock = threading.Lock()
        self._add_missing_columns()
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def _add_missing_columns(self) -> None:
        """Databases written by an older version lack the newer task columns; add them in place."""
        conn = self._conn()
        have = {row["name"] for row in conn.execute("PRAGMA table_info(tasks)")}
        if not have:
            return  # a new database: SCHEMA creates everything
        for column in ("idempotency_key", "request_digest", "webhook_url", "owner", "reason"):
            if column not in have:
                conn.execute(f"ALTER TABLE tasks ADD COLUMN {column} TEXT")
        if "given_back" not in have:
            conn.execute("ALTER TABLE tasks ADD COLUMN given_back INTEGER NOT NULL DEFAULT 0")
        if "webhook_due" not in have:  # the webhook outbox
            conn.execute("ALTER TABLE tasks ADD COLUMN webhook_due REAL")
            conn.execute("ALTER TABLE tasks ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0")
        if "lane" not in {row["name"] for row in conn.execute("PRAGMA table_info(queue)")}:
            conn.execute("ALTER TABLE queue ADD COLUMN lane INTEGER NOT NULL DEFAULT 0")
        if "version" not in {row["name"] for row in conn.execute("PRAGMA table_info(meta)")}:
            conn.execute("ALTER TABLE meta ADD COLUMN version INTEGER NOT NULL DEFAULT 0")

    def read(self) -> sqlite3.Connection:
        return self._conn()

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version): a read, no lock."""
        return int(self._conn().execute("PRAGMA data_version").fetchone()[0])

    def change_token(self) -> int:
        """Like data_version, from one connection that never writes, whichever thread asks: every commit
        (this process's too) is another connection's, and the values of one connection compare."""
        with self._watch_lock:
            if self._watch is None:
                self._watch = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                else:
                    conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if is_storage_full(exc):
                raise StorageFull(str(exc)) from exc
            raise
