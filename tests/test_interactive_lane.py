"""The interactive lane (service/lanes.py): /format_input's LM-only task is received before the
generations queued ahead of it, so it waits at most for the engine call in progress."""
from __future__ import annotations

import sqlite3
import time

from engine.request import GenerationRequest
from service.embedded import make_embedded_backend
from service.embedded.db import Database
from service.format_via_worker import format_request
from service.lanes import is_interactive
from service.records import TaskRecord


def _submit(backend, task_id: str, request: GenerationRequest) -> None:
    backend.intake.submit(TaskRecord(task_id=task_id, request=request, created_at=time.time()), 100)


def test_a_format_task_is_received_before_the_generations_ahead_of_it(settings):
    backend = make_embedded_backend(settings)
    for i in range(3):
        _submit(backend, f"song-{i}", GenerationRequest(prompt="a song"))
    fmt = format_request(caption="jazz", lyrics="", metadata={}, temperature=0.85)
    assert is_interactive(fmt) and not is_interactive(GenerationRequest(prompt="a song"))
    _submit(backend, "format", fmt)
    _submit(backend, "song-3", GenerationRequest(prompt="a song"))
    order = [backend.queue.receive(0, 60).task_id for _ in range(5)]
    assert order == ["format", "song-0", "song-1", "song-2", "song-3"]  # the rest in their own order


def test_an_older_queue_table_gets_the_lane_column(tmp_path):
    path = str(tmp_path / "old.db")
    Database(path)
    with sqlite3.connect(path) as conn:  # the queue table as versions before the lane wrote it
        conn.execute("DROP TABLE queue")
        conn.execute("CREATE TABLE queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL UNIQUE,"
                     " visible_at REAL NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0, receipt TEXT)")
    db = Database(path)
    assert "lane" in {row["name"] for row in db.read().execute("PRAGMA table_info(queue)")}
