"""TaskStore on SQLite."""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Optional

from ..records import (
    CANCELLED, FAILED, GIVEN_BACK_STAGE, HEARTBEAT_RETENTION_SECONDS, QUEUED, RUNNING, STATUSES, SUCCEEDED, FailureReason,
    TaskRecord, TaskResult, WorkerHeartbeat, dump_request, load_request,
)
from ..ports import TaskStore, WebhookDue
from .db import Database

# In the write that ends a task: its webhook, if it has one, goes into the outbox due at once (the
# same ? as finished_at; SET expressions read the row as it was before the update).
_OUTBOX = "webhook_due = CASE WHEN webhook_url IS NOT NULL THEN ? END"


def record_from_row(row: sqlite3.Row, strict: bool = False) -> TaskRecord:
    """strict: StoredRequestInvalid when its request no longer parses (records.load_request)."""
    return TaskRecord(
        task_id=row["task_id"],
        request=load_request(row["task_id"], row["request"], strict),
        status=row["status"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        progress=row["progress"],
        stage=row["stage"],
        attempt=row["attempt"],
        given_back=row["given_back"],
        worker_id=row["worker_id"],
        result=TaskResult.model_validate_json(row["result"]) if row["result"] else None,
        error=row["error"],
        reason=FailureReason(row["reason"]) if row["reason"] else None,
        blob_keys=json.loads(row["blob_keys"]),
        idempotency_key=row["idempotency_key"],
        request_digest=row["request_digest"],
        webhook_url=row["webhook_url"],
        owner=row["owner"],
    )


def insert_task(c: sqlite3.Connection, record: TaskRecord) -> None:
    c.execute(
        "INSERT INTO tasks (task_id, status, request, created_at, stage, blob_keys, idempotency_key,"
        " request_digest, webhook_url, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.task_id, record.status, dump_request(record.request), record.created_at, record.stage,
         json.dumps(record.blob_keys), record.idempotency_key, record.request_digest, record.webhook_url,
         record.owner),
    )


def _code(reason: Optional[FailureReason]) -> Optional[str]:
    return reason.value if reason is not None else None


class SqliteTaskStore(TaskStore):
    def __init__(self, db: Database):
        self.db = db

    def change_token(self) -> int:
        return self.db.change_token()

    def create(self, record: TaskRecord) -> None:
        with self.db.write() as c:
            insert_task(c, record)

    def find_by_idempotency_key(self, key: str) -> Optional[TaskRecord]:
        row = self.db.read().execute("SELECT * FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
        return record_from_row(row) if row else None

    def get(self, task_id: str) -> Optional[TaskRecord]:
        row = self.db.read().execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return record_from_row(row) if row else None

    def get_many(self, task_ids: list[str]) -> dict[str, TaskRecord]:
        ids = list(dict.fromkeys(task_ids))
        out: dict[str, TaskRecord] = {}
        for i in range(0, len(ids), 500):  # stay under SQLite's variable limit
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.read().execute(f"SELECT * FROM tasks WHERE task_id IN ({marks})", chunk):
                out[row["task_id"]] = record_from_row(row)
        return out

    def delete(self, task_id: str) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))

    def claim(self, task_id: str, worker_id: str) -> Optional[TaskRecord]:
        with self.db.write() as c:
            row = c.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None or row["status"] not in (QUEUED, RUNNING):
                return None
            record = record_from_row(row, strict=True)
            record.status, record.attempt, record.worker_id = RUNNING, record.attempt + 1, worker_id
            record.started_at, record.progress, record.stage = time.time(), 0.0, "running"
            c.execute(
                "UPDATE tasks SET status = ?, attempt = ?, worker_id = ?, started_at = ?,"
                " progress = 0, stage = 'running' WHERE task_id = ?",
                (RUNNING, record.attempt, worker_id, record.started_at, task_id),
            )
            return record

    def update_progress(self, task_id: str, attempt: int, progress: float, stage: str) -> bool:
        with self.db.write() as c:
            cur = c.execute(
                "UPDATE tasks SET progress = ?, stage = ? WHERE task_id = ? AND status = ? AND attempt = ?",
                (progress, stage, task_id, RUNNING, attempt),
            )
            return cur.rowcount == 1

    def give_back(self, task_id: str, attempt: int) -> bool:
        with self.db.write() as c:
            cur = c.execute(
                "UPDATE tasks SET given_back = given_back + 1, progress = 0, stage = ?"
                " WHERE task_id = ? AND status = ? AND attempt = ?",
                (GIVEN_BACK_STAGE, task_id, RUNNING, attempt),
            )
            return cur.rowcount == 1

    def finish(self, task_id: str, attempt: int, *, result: Optional[TaskResult] = None,
               error: Optional[str] = None, reason: Optional[FailureReason] = None,
               blob_keys: Optional[list[str]] = None) -> bool:
        status = FAILED if error is not None else SUCCEEDED
        with self.db.write() as c:
            row = c.execute(
                "SELECT blob_keys FROM tasks WHERE task_id = ? AND status = ? AND attempt = ?",
                (task_id, RUNNING, attempt),
            ).fetchone()
            if row is None:
                return False
            keys = json.loads(row["blob_keys"]) + [k for k in (blob_keys or [])]
            now = time.time()
            c.execute(
                "UPDATE tasks SET status = ?, finished_at = ?, progress = ?, stage = ?, result = ?,"
                " error = ?, reason = ?, blob_keys = ?, " + _OUTBOX + " WHERE task_id = ?",
                (status, now, 1.0 if status == SUCCEEDED else 0.0, status,
                 result.model_dump_json() if result is not None else None, error, _code(reason),
                 json.dumps(list(dict.fromkeys(keys))), now, task_id),
            )
            return True

    def fail_unfinished(self, task_id: str, error: str, reason: FailureReason) -> bool:
        now = time.time()
        with self.db.write() as c:
            cur = c.execute(
                "UPDATE tasks SET status = ?, finished_at = ?, stage = ?, error = ?, reason = ?, " + _OUTBOX +
                " WHERE task_id = ? AND status IN (?, ?)",
                (FAILED, now, FAILED, error, _code(reason), now, task_id, QUEUED, RUNNING),
            )
            return cur.rowcount == 1

    def cancel(self, task_id: str, reason: str) -> bool:
        with self.db.write() as c:
            row = c.execute("SELECT status FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None or row["status"] not in (QUEUED, RUNNING):
                return False
            now = time.time()
            c.execute("UPDATE tasks SET status = ?, finished_at = ?, stage = ?, error = ?, reason = ?, " + _OUTBOX +
                      " WHERE task_id = ?", (CANCELLED, now, CANCELLED, reason, _code(FailureReason.CANCELLED), now,
                                             task_id))
            if row["status"] == QUEUED:  # not waiting any more: out of the queue now
                c.execute("DELETE FROM queue WHERE task_id = ?", (task_id,))
            return True

    def webhooks_due(self, now: float, limit: int) -> list[WebhookDue]:
        rows = self.db.read().execute(
            "SELECT task_id, webhook_url, webhook_attempts, webhook_due FROM tasks"
            " WHERE webhook_due IS NOT NULL AND webhook_due <= ? ORDER BY webhook_due LIMIT ?",
            (now, max(0, int(limit))))
        return [WebhookDue(r["task_id"], r["webhook_url"], r["webhook_attempts"], r["webhook_due"]) for r in rows]

    def claim_webhook(self, due: WebhookDue, lease_until: float) -> bool:
        with self.db.write() as c:
            cur = c.execute("UPDATE tasks SET webhook_due = ?, webhook_attempts = webhook_attempts + 1"
                            " WHERE task_id = ? AND webhook_due = ?", (lease_until, due.task_id, due.due_at))
            return cur.rowcount == 1

    def settle_webhook(self, task_id: str, claimed_until: float, retry_at: Optional[float]) -> bool:
        with self.db.write() as c:
            cur = c.execute("UPDATE tasks SET webhook_due = ? WHERE task_id = ? AND webhook_due = ?",
                            (retry_at, task_id, claimed_until))
            return cur.rowcount == 1

    def delete_finished_before(self, cutoff: float, limit: int = 500) -> list[TaskRecord]:
        """Remove up to `limit` tasks that finished before `cutoff`; returns them (for their blobs)."""
        with self.db.write() as c:
            rows = c.execute("SELECT * FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?"
                             " ORDER BY finished_at LIMIT ?", (cutoff, limit)).fetchall()
            c.executemany("DELETE FROM tasks WHERE seq = ?", [(r["seq"],) for r in rows])
        return [record_from_row(r) for r in rows]

    def unfinished_blob_keys(self) -> set[str]:
        """Blob keys that queued and running tasks still need (bounded by the queue size)."""
        rows = self.db.read().execute("SELECT blob_keys FROM tasks WHERE status IN (?, ?)", (QUEUED, RUNNING))
        return {key for row in rows for key in json.loads(row["blob_keys"])}

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for row in self.db.read().execute("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status"):
            out[row["status"]] = row["n"]
        out["total"] = sum(out[s] for s in STATUSES)
        return out

    def recent_finished(self, limit: int) -> list[TaskRecord]:
        rows = self.db.read().execute(
            "SELECT * FROM tasks WHERE finished_at IS NOT NULL AND started_at IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT ?", (max(0, int(limit)),))
        return [record_from_row(r) for r in rows]

    def queue_positions(self, task_ids: list[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(task_ids))[:500]  # SQLite's variable limit; a poll asks for at most 200
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.read().execute(
            "SELECT task_id, pos FROM (SELECT task_id, ROW_NUMBER() OVER (ORDER BY seq) AS pos FROM tasks"
            f" WHERE status = ?) WHERE task_id IN ({marks})", (QUEUED, *ids))
        return {row["task_id"]: int(row["pos"]) for row in rows}

    def queued_task_ids(self, limit: int) -> list[str]:
        rows = self.db.read().execute("SELECT task_id FROM tasks WHERE status = ? ORDER BY seq LIMIT ?",
                                      (QUEUED, max(0, int(limit))))
        return [row["task_id"] for row in rows]

    def put_meta(self, key: str, value: dict[str, Any]) -> None:
        with self.db.write() as c:
            c.execute("INSERT INTO meta (key, value, version) VALUES (?, ?, 1)"
                      " ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = meta.version + 1",
                      (key, json.dumps(value)))

    def put_meta_if(self, key: str, value: dict[str, Any], version: int) -> bool:
        with self.db.write() as c:  # BEGIN IMMEDIATE: the compare and the write under one lock
            row = c.execute("SELECT version FROM meta WHERE key = ?", (key,)).fetchone()
            if (int(row["version"]) if row else 0) != version:
                return False
            c.execute("INSERT INTO meta (key, value, version) VALUES (?, ?, ?) ON CONFLICT(key)"
                      " DO UPDATE SET value = excluded.value, version = excluded.version",
                      (key, json.dumps(value), version + 1))
        return True

    def record_heartbeat(self, beat: WorkerHeartbeat) -> None:
        with self.db.write() as c:
            c.execute("INSERT INTO workers (worker_id, beat_at, beat) VALUES (?, ?, ?) ON CONFLICT(worker_id)"
                      " DO UPDATE SET beat_at = excluded.beat_at, beat = excluded.beat",
                      (beat.worker_id, beat.beat_at, beat.model_dump_json()))
            c.execute("DELETE FROM workers WHERE beat_at < ?", (time.time() - HEARTBEAT_RETENTION_SECONDS,))

    def heartbeats(self) -> list[WorkerHeartbeat]:
        rows = self.db.read().execute("SELECT beat FROM workers WHERE beat_at >= ? ORDER BY worker_id",
                                      (time.time() - HEARTBEAT_RETENTION_SECONDS,))
        return [WorkerHeartbeat.model_validate_json(r["beat"]) for r in rows]

    def forget_heartbeat(self, worker_id: str) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def get_meta(self, key: str) -> Optional[dict[str, Any]]:
        row = self.db.read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else None

    def get_meta_versioned(self, key: str) -> tuple[Optional[dict[str, Any]], int]:
        row = self.db.read().execute("SELECT value, version FROM meta WHERE key = ?", (key,)).fetchone()
        return (json.loads(row["value"]), int(row["version"])) if row else (None, 0)
