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


# -- AWS: the lane is a second SQS queue (service/aws/sqs_queue.py) ------------------------------------

LANE_QUEUE = "acestep-test-interactive"


def _queued_ids(aws, url: str) -> list[str]:
    """Task ids waiting in one queue (received and left to lapse in 1 s)."""
    from service.aws.sqs_queue import decode_body

    resp = aws.queue._sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=1)
    return sorted(decode_body(m["Body"]) for m in resp.get("Messages", []))


def _format_request() -> GenerationRequest:
    return format_request(caption="jazz", lyrics="", metadata={}, temperature=0.85)


def test_aws_a_format_task_is_received_before_the_generations_ahead_of_it(tmp_path, settings):
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings, interactive_queue_url=LANE_QUEUE) as aws:
        lane = aws.settings.interactive_queue_url
        assert lane.endswith("/" + LANE_QUEUE) and aws.queue.interactive_url == lane
        for i in range(3):
            _submit(aws, f"song-{i}", GenerationRequest(prompt="a song"))
        _submit(aws, "format", _format_request())
        _submit(aws, "song-3", GenerationRequest(prompt="a song"))
        first = aws.queue.receive(0, 60)
        assert first.task_id == "format" and first.queue_url == lane
        aws.queue.release(first)  # a give-back returns it to its own lane, still ahead of the generations
        again = aws.queue.receive(0, 60)
        assert again.task_id == "format" and again.receipt != first.receipt
        aws.queue.extend(again, 60)  # its receipt is the lane queue's: extend and ack find it there
        aws.queue.ack(again)
        assert _queued_ids(aws, lane) == []
        rest = [aws.queue.receive(0, 60).task_id for _ in range(4)]
        assert sorted(rest) == ["song-0", "song-1", "song-2", "song-3"]


def test_aws_an_idle_receive_sees_a_format_task_during_its_long_poll(tmp_path, settings):
    """The main queue's long poll is cut into LANE_POLL_SECONDS slices, each after a look at the lane:
    a format task sent while a worker waits on an empty main queue is received in that same wait."""
    import threading

    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings, interactive_queue_url=LANE_QUEUE) as aws:
        sender = threading.Timer(0.3, lambda: aws.queue.send("format", interactive=True))
        sender.start()
        try:
            lease = aws.queue.receive(8, 60)
        finally:
            sender.join()
        assert lease is not None and lease.task_id == "format"


def test_aws_dead_letters_and_ghosts_go_back_to_their_lane(tmp_path, settings):
    from service.aws.dlq import drain_dead_letters
    from service.aws.ghosts import GRACE_SECONDS, resend_ghosts
    from service.aws.sqs_queue import encode_body

    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings, interactive_queue_url=LANE_QUEUE) as aws:
        s = aws.settings
        now = time.time()
        for task_id, request in (("format", _format_request()), ("song", GenerationRequest(prompt="a song"))):
            aws.store.create(TaskRecord(task_id=task_id, request=request, created_at=now))  # submitter died here
        assert sorted(resend_ghosts(aws.store, aws.queue, now=now + GRACE_SECONDS + 1)) == ["format", "song"]
        assert _queued_ids(aws, s.interactive_queue_url) == ["format"] and _queued_ids(aws, s.queue_url) == ["song"]
        time.sleep(1.1)  # the look above hid them for 1 s
        for lease in (aws.queue.receive(0, 60), aws.queue.receive(0, 60)):
            aws.queue.ack(lease)
        # Both dead-lettered before any worker claimed them (the lanes share one DLQ): each goes back to its lane.
        for task_id in ("format", "song"):
            aws.queue._sqs.send_message(QueueUrl=s.dlq_url, MessageBody=encode_body(task_id))
        assert drain_dead_letters(aws) == []
        assert _queued_ids(aws, s.interactive_queue_url) == ["format"] and _queued_ids(aws, s.queue_url) == ["song"]


def test_aws_without_a_lane_queue_every_task_shares_the_main_queue(tmp_path, settings):
    """ACESTEP_INTERACTIVE_QUEUE_URL empty (configs from before the lane): one queue, in its own order."""
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings) as aws:
        assert aws.settings.interactive_queue_url == "" and aws.queue.interactive_url == ""
        _submit(aws, "song-0", GenerationRequest(prompt="a song"))
        _submit(aws, "format", _format_request())
        assert _queued_ids(aws, aws.settings.queue_url) == ["format", "song-0"]
        time.sleep(1.1)
        leases = [aws.queue.receive(0, 60), aws.queue.receive(0, 60)]
        assert sorted(lease.task_id for lease in leases) == ["format", "song-0"]
        assert {lease.queue_url for lease in leases} == {aws.settings.queue_url}


# -- the worker: an LM-only call goes before the generation held over from the last batch ---------------

def _held_over_then_format(settings, backend) -> list[str]:
    """A batch of one leaves the next generation held over (it does not fit); a format call arrives while
    the batch runs. Returns the order the worker's engine ran them in."""
    from service.worker import Worker
    from tests.worker_support import ScriptedEngine, submit

    engine = ScriptedEngine()
    engine.lm_loaded = True
    order: list[str] = []
    first = submit(backend, prompt="short", audio_duration=10)
    held = submit(backend, prompt="long", audio_duration=20)
    worker = Worker(settings, backend, engine)
    fmt = "format-call"
    engine.before_generate = lambda progress: (
        _submit(backend, fmt, _format_request()) if not order else None, order.append("call"))
    worker.run_once(1.0)
    assert backend.store.get(first).status == "succeeded" and worker.assembler.carried is not None
    worker.run_once(0)
    ran_second = [t for t in (fmt, held) if backend.store.get(t).status == "succeeded"]
    worker.run_once(0)
    assert backend.store.get(held).status == "succeeded" and backend.store.get(fmt).status == "succeeded"
    return ran_second


def test_a_format_call_goes_before_the_generation_held_over(settings):
    backend = make_embedded_backend(settings)
    assert _held_over_then_format(settings, backend) == ["format-call"]


def test_aws_a_format_call_goes_before_the_generation_held_over(tmp_path, settings):
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings, interactive_queue_url=LANE_QUEUE) as aws:
        assert _held_over_then_format(aws.settings, aws) == ["format-call"]
