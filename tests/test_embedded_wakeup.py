"""The embedded queue's waiting and writing: idle receivers take no write lock, a submit wakes a
receiver of another process (data_version), and threads of one process queue for the write lock."""
from __future__ import annotations

import threading

import pytest

from service.config import Settings
from service.embedded import make_embedded_backend, queue as queue_module
from service.embedded.db import Database
from service.submission import submit_task
from engine.request import GenerationRequest


@pytest.fixture
def data_dir(tmp_path) -> str:
    return str(tmp_path / "data")


def count_writes(db: Database) -> list[int]:
    calls = [0]
    original = db.write

    def write():
        calls[0] += 1
        return original()

    db.write = write  # type: ignore[method-assign]
    return calls


def test_an_idle_receiver_takes_no_write_lock(data_dir):
    backend = make_embedded_backend(Settings(data_dir=data_dir))
    writes = count_writes(backend.queue.db)  # type: ignore[attr-defined]
    assert backend.queue.receive(0.05, 30) is None
    assert writes[0] == 0


def test_a_submit_wakes_a_receiver_of_another_process(data_dir, monkeypatch):
    """No condition variable crosses processes: the receiver sees the commit through data_version
    (the fallback re-read is pushed past the test's wait, so only that path can wake it)."""
    monkeypatch.setattr(queue_module, "FALLBACK_SECONDS", 600.0)
    receiver = make_embedded_backend(Settings(data_dir=data_dir))
    monkeypatch.setattr(receiver.queue, "_cond", threading.Condition())  # as in another process: no notify
    submitter = make_embedded_backend(Settings(data_dir=data_dir))
    got: list = []
    thread = threading.Thread(target=lambda: got.append(receiver.queue.receive(600, 30)), daemon=True)
    thread.start()
    task_id, _ = submit_task(submitter, GenerationRequest(prompt="x"), max_queue=10)
    thread.join(60)
    assert not thread.is_alive() and got and got[0].task_id == task_id


def test_a_lapsed_lease_is_redelivered_to_a_waiting_receiver(data_dir, monkeypatch):
    """Nothing commits when a lease lapses; the receiver wakes when the next task falls due."""
    monkeypatch.setattr(queue_module, "FALLBACK_SECONDS", 600.0)
    backend = make_embedded_backend(Settings(data_dir=data_dir))
    task_id, _ = submit_task(backend, GenerationRequest(prompt="x"), max_queue=10)
    first = backend.queue.receive(0, 0.2)
    assert first is not None and first.task_id == task_id
    again = backend.queue.receive(60, 30)
    assert again is not None and again.task_id == task_id and again.receive_count == 2


def test_concurrent_writers_of_one_process_all_commit(data_dir):
    backend = make_embedded_backend(Settings(data_dir=data_dir))
    errors: list[BaseException] = []

    def submit_many():
        try:
            for _ in range(10):
                submit_task(backend, GenerationRequest(prompt="x"), max_queue=1000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and backend.store.counts()["queued"] == 80 and backend.queue.size() == 80


def test_every_database_object_on_one_file_shares_the_writer_lock(data_dir, tmp_path):
    a = Database(str(tmp_path / "one.db"))
    b = Database(str(tmp_path / "one.db"))
    c = Database(str(tmp_path / "other.db"))
    assert a._write_lock is b._write_lock and a._write_lock is not c._write_lock
