"""SQS queue specifics (moto in-process): long polling, redrive to the DLQ and the drain, size cache."""
from __future__ import annotations

import json
import time

import pytest

from service.aws.dlq import drain_dead_letters
from service.aws.provision import provision
from service.aws.sqs_queue import SqsTaskQueue
from service.ports import FAILED, QueueFull, TaskRecord
from service.records import TaskResult
from tests.aws_support import aws_backend
from engine.request import GenerationRequest


def test_receive_without_wait_returns_at_once(tmp_path):
    with aws_backend(tmp_path) as aws:
        started = time.monotonic()
        assert aws.queue.receive(0, 30) is None
        assert time.monotonic() - started < 0.5


def test_long_poll_picks_up_a_message_that_becomes_visible(tmp_path):
    with aws_backend(tmp_path) as aws:
        aws.queue.enqueue("a", 10)
        lease = aws.queue.receive(1, 1)
        started = time.monotonic()
        again = aws.queue.receive(5, 30)  # waits for the 1 s lease to lapse, not the full 5 s
        assert again.task_id == "a" and again.receipt != lease.receipt
        assert time.monotonic() - started < 4


def test_stale_receipts_are_ignored(tmp_path):
    with aws_backend(tmp_path) as aws:
        aws.queue.enqueue("a", 10)
        lease = aws.queue.receive(1, 30)
        aws.queue.ack(lease)
        aws.queue.extend(lease, 30)  # the heartbeat of a worker whose task was acked must not crash
        aws.queue.release(lease)
        aws.queue.ack(lease)
        assert aws.queue.receive(0, 30) is None


def test_redrive_then_drain_marks_the_task_failed_with_its_reason(tmp_path):
    with aws_backend(tmp_path, max_receives=2) as aws:
        aws.store.create(TaskRecord(task_id="poison", request=GenerationRequest()))
        aws.queue.enqueue("poison", 10)
        for _ in range(2):  # each delivery is claimed, makes progress, then the worker "dies"
            lease = aws.queue.receive(1, 30)
            attempt = aws.store.claim("poison", "w").attempt
            aws.store.update_progress("poison", attempt, 0.4, "dit")
            aws.queue.extend(lease, 0)  # its lease lapses at once
        assert aws.queue.receive(0, 30) is None  # the third receive moved it to the DLQ
        assert drain_dead_letters(aws) == ["poison"]
        rec = aws.store.get("poison")
        assert rec.status == FAILED
        assert rec.error == ("dead-lettered after 2 deliveries: the worker stopped each time; "
                             "last seen at stage 'dit' (40%)")
        assert aws.store.counts()["failed"] == 1
        assert drain_dead_letters(aws) == []  # the message was deleted from the DLQ


def test_drain_drops_letters_of_finished_tasks(tmp_path):
    with aws_backend(tmp_path) as aws:
        aws.store.create(TaskRecord(task_id="done", request=GenerationRequest()))
        a = aws.store.claim("done", "w").attempt
        aws.store.finish("done", a, result=TaskResult())
        sqs = aws.queue._sqs
        sqs.send_message(QueueUrl=aws.settings.dlq_url, MessageBody=json.dumps({"task_id": "done"}))
        assert aws.drain_dead_letters() == 0  # the hook the worker loop calls
        assert aws.store.get("done").status == "succeeded"
        attrs = sqs.get_queue_attributes(QueueUrl=aws.settings.dlq_url, AttributeNames=["All"])["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_drain_is_a_no_op_without_a_dlq(settings):
    from service.embedded import make_embedded_backend

    assert drain_dead_letters(make_embedded_backend(settings)) == []


def test_queue_full_reads_the_backlog_once_per_second(tmp_path):
    with aws_backend(tmp_path) as aws:
        sqs = aws.queue._sqs
        reads = []
        sqs.meta.events.register("before-call.sqs.GetQueueAttributes", lambda **kw: reads.append(1))
        api = SqsTaskQueue(sqs, aws.settings.queue_url)  # a fresh API instance
        for i in range(3):
            api.enqueue(f"t{i}", 3)
        with pytest.raises(QueueFull):
            api.enqueue("t3", 3)
        assert len(reads) == 1  # the cached backlog counted this instance's own sends
        lease = aws.queue.receive(1, 30)  # a worker takes one: backlog 2
        assert lease is not None
        time.sleep(1.1)
        api.enqueue("t4", 3)
        assert len(reads) == 2


def test_provision_is_idempotent_and_sets_the_redrive(tmp_path):
    with aws_backend(tmp_path, max_receives=4, visibility_timeout=90) as aws:
        again = provision(aws.settings)
        assert (again.queue_url, again.dlq_url) == (aws.settings.queue_url, aws.settings.dlq_url)
        attrs = aws.queue._sqs.get_queue_attributes(QueueUrl=again.queue_url, AttributeNames=["All"])["Attributes"]
        redrive = json.loads(attrs["RedrivePolicy"])
        assert int(redrive["maxReceiveCount"]) == 4 and redrive["deadLetterTargetArn"].endswith("-dlq")
        assert attrs["VisibilityTimeout"] == "90"


def _messages(aws) -> list[str]:
    """Every task id waiting in the main queue (received and left to lapse, so the test reads them once)."""
    resp = aws.queue._sqs.receive_message(QueueUrl=aws.settings.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
    return sorted(json.loads(m["Body"])["task_id"] for m in resp.get("Messages", []))


def test_a_task_left_without_its_message_is_sent_once_after_the_grace_period(tmp_path):
    """Issue 21.11: a submitter that died between the DynamoDB write and the SQS send (only the create
    happened) left the task queued forever; the reconciler on the drain's schedule sends it, once, fenced."""
    from service.aws.ghosts import GRACE_SECONDS, resend_ghosts
    from service.aws.dynamo_store import DynamoTaskStore
    from service.aws.clients import aws_client

    with aws_backend(tmp_path) as aws:
        now = time.time()
        aws.store.create(TaskRecord(task_id="ghost", request=GenerationRequest(), created_at=now))  # then it died
        aws.intake.submit(TaskRecord(task_id="whole", request=GenerationRequest(), created_at=now), 10)
        aws.store.create(TaskRecord(task_id="claimed", request=GenerationRequest(), created_at=now))
        aws.store.claim("claimed", "w")  # it ran: a message reached a worker
        assert resend_ghosts(aws.store, aws.queue, now=now + 10) == []  # within the grace: its submitter may be alive
        # Two workers' reconcilers saw the same mark; the rival's take lands in the window before ours.
        rival = DynamoTaskStore(aws_client("dynamodb", aws.settings), aws.settings.table_name)
        later = now + GRACE_SECONDS + 1
        rivals: list = []
        aws.store._db.meta.events.register(
            "before-call.dynamodb.UpdateItem",
            lambda **kw: rivals or rivals.append(resend_ghosts(rival, aws.queue, now=later)))
        assert resend_ghosts(aws.store, aws.queue, now=later) == []  # fenced out: the rival sent it
        assert rivals == [["ghost"]]
        assert _messages(aws) == ["ghost", "whole"]  # one message each
        assert resend_ghosts(aws.store, aws.queue, now=later + 2 * GRACE_SECONDS) == []  # sent: not a ghost any more
        assert aws.drain_dead_letters() == 0  # the worker's hook runs it too
