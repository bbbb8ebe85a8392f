"""TaskQueue on SQS (standard queue).

Leases are SQS receipts: extend changes the message's visibility, ack deletes it. After
settings.max_receives deliveries the queue's redrive policy moves a message to the dead-letter
queue; service/aws/dlq.py then marks its task failed. A give-back (release) is not a delivery
spent: SQS counts every receive of a message, so release replaces the message with a fresh one.

Interactive lane (service/lanes.py): with `interactive_url` set, LM-only tasks go to a queue of their
own, which every receive reads first. SQS cannot long-poll two queues at once, so a receive alternates:
the interactive queue without waiting, then the main queue for at most LANE_POLL_SECONDS. An idle
worker thus sees an interactive task within LANE_POLL_SECONDS (a main-queue long poll of up to 20 s
would hide it), for two requests per LANE_POLL_SECONDS instead of one per 20 s. Both queues redrive to
the one dead-letter queue. Without `interactive_url` every task goes to the main queue, as before.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

from botocore.exceptions import ClientError

from ..ports import Lease, QueueFull, TaskQueue
from .clients import AwsClient, error_code

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 20  # SQS long-poll ceiling
# The main queue's wait between two looks at the interactive queue (bench/format_latency.py measures it).
LANE_POLL_SECONDS = 1
MAX_VISIBILITY_SECONDS = 12 * 3600
RELEASE_HOLD_SECONDS = 60  # the old message stays hidden while its replacement is sent
# The receipt no longer names an in-flight message (already deleted, or redelivered to someone else).
_STALE_RECEIPT = {"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight",
                  "AWS.SimpleQueueService.MessageNotInflight"}


def _visibility(seconds: float) -> int:
    # SQS counts whole seconds; round up so a lease never ends earlier than asked.
    return max(0, min(MAX_VISIBILITY_SECONDS, int(math.ceil(seconds))))


def encode_body(task_id: str, requeues: int = 0, spent: int = 0) -> str:
    return json.dumps({"task_id": task_id, **({"requeues": requeues} if requeues else {}),
                       **({"spent": spent} if spent else {})})


def spent_of(body: str) -> int:
    """Deliveries lost before a give-back replaced the message (see SqsTaskQueue.release)."""
    try:
        return max(0, int(json.loads(body).get("spent", 0)))
    except (ValueError, TypeError, AttributeError):
        return 0


def decode_body(body: str) -> str:
    try:
        return str(json.loads(body)["task_id"])
    except (ValueError, KeyError, TypeError):
        return body  # a bare id, e.g. sent by hand from the console


def requeues_of(body: str) -> int:
    """How often the dead-letter drain sent this never-claimed task back (service/aws/dlq.py)."""
    try:
        return max(0, int(json.loads(body).get("requeues", 0)))
    except (ValueError, TypeError, AttributeError):
        return 0


@dataclass
class DeadLetter(Lease):
    requeues: int = 0


@dataclass
class SqsLease(Lease):
    """A lease with the queue its message came from (main or interactive): its receipt is valid there only."""
    queue_url: str = ""


class SqsTaskQueue(TaskQueue):
    def __init__(self, client: AwsClient, queue_url: str, dlq_url: str = "", size_cache_seconds: float = 1.0,
                 max_receives: int = 0, interactive_url: str = ""):
        self._sqs = client
        self.queue_url = queue_url
        self.dlq_url = dlq_url
        self.interactive_url = interactive_url  # "": no separate lane, interactive tasks use the main queue
        # The redrive policy's limit, applied here too to the deliveries a replaced message carries over.
        self.max_receives = max_receives
        self._cache_seconds = size_cache_seconds
        self._lock = threading.Lock()
        self._cached_size: Optional[int] = None
        self._cached_at = 0.0

    def enqueue(self, task_id: str, max_size: int) -> None:
        if self.size() >= max_size:
            raise QueueFull(f"{max_size} tasks are already waiting")
        self.send(task_id)

    def lane_url(self, interactive: bool) -> str:
        """The queue a task of that lane is sent to."""
        return self.interactive_url if interactive and self.interactive_url else self.queue_url

    def send(self, task_id: str, interactive: bool = False) -> None:
        """Enqueue without the (approximate) size check: the intake bounds the queue in DynamoDB."""
        self._send(self.lane_url(interactive), encode_body(task_id))

    def _send(self, url: str, body: str) -> None:
        self._sqs.send_message(QueueUrl=url, MessageBody=body)
        if url == self.queue_url:  # size() counts the main queue's backlog
            self._adjust_cached_size(+1)

    def receive(self, wait_seconds: float, visibility_timeout: float) -> Optional[Lease]:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            if self.interactive_url:
                lease = self._receive_from(self.interactive_url, 0, visibility_timeout)
                if lease is not None:
                    return lease
            remaining = max(0.0, deadline - time.monotonic())
            wait = min(remaining, LANE_POLL_SECONDS) if self.interactive_url else remaining
            lease = self._receive_from(self.queue_url, wait, visibility_timeout)
            if lease is not None:
                return lease
            if deadline - time.monotonic() <= 0:
                return None

    def receive_interactive(self, visibility_timeout: float) -> Optional[Lease]:
        if not self.interactive_url:  # one queue: interactive tasks come through receive, in order
            return None
        return self._receive_from(self.interactive_url, 0, visibility_timeout)

    def _receive_from(self, url: str, wait_seconds: float, visibility_timeout: float) -> Optional[SqsLease]:
        """One message from `url` within `wait_seconds` (None if none came); a message past max_receives
        is dead-lettered on the way."""
        while True:
            resp = self._sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=max(0, min(MAX_WAIT_SECONDS, int(math.ceil(wait_seconds)))),
                VisibilityTimeout=max(1, _visibility(visibility_timeout)),
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            messages = resp.get("Messages", [])
            if not messages:
                return None
            msg = messages[0]
            count = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", "1")) + spent_of(msg["Body"])
            if url == self.queue_url:
                self._adjust_cached_size(-1)
            lease = SqsLease(task_id=decode_body(msg["Body"]), receipt=msg["ReceiptHandle"], receive_count=count,
                             queue_url=url)
            if self.max_receives and self.dlq_url and count > self.max_receives:
                self._dead_letter(lease, count - 1)  # what the redrive policy would do, had it seen them all
                wait_seconds = 0  # look again at once: a live message may wait behind it
                continue
            return lease

    def _url_of(self, lease: Lease) -> str:
        return getattr(lease, "queue_url", "") or self.queue_url

    def extend(self, lease: Lease, visibility_timeout: float) -> None:
        self._change_visibility(lease, _visibility(visibility_timeout))

    def release(self, lease: Lease) -> None:
        """Give the task back for another worker without spending one of its deliveries.

        SQS's receive count (what its redrive policy reads) cannot be lowered, so the message is
        replaced: a new one is sent, then the old one deleted. The old receipt is checked first, so
        a stale lease (acked, or redelivered elsewhere) gives back nothing.
        """
        if not self._change_visibility(lease, RELEASE_HOLD_SECONDS):
            return
        # The deliveries lost before this one (crashes, kills) carry over; this one does not count.
        body = encode_body(lease.task_id, spent=lease.receive_count - 1)
        self._send(self._url_of(lease), body)  # back to its own lane
        self.ack(lease)

    def _dead_letter(self, lease: Lease, lost: int) -> None:
        self._sqs.send_message(QueueUrl=self.dlq_url, MessageBody=encode_body(lease.task_id, spent=lost))
        self.ack(lease)
        log.warning("task %s moved to the dead-letter queue after %d lost deliveries", lease.task_id, lost)

    def ack(self, lease: Lease) -> None:
        try:
            self._sqs.delete_message(QueueUrl=self._url_of(lease), ReceiptHandle=lease.receipt)
        except ClientError as exc:
            if error_code(exc) not in _STALE_RECEIPT:
                raise
            log.warning("ack of %s ignored: receipt no longer valid", lease.task_id)

    def receive_dead_letters(self, max_messages: int = 10, wait_seconds: int = 0) -> list[DeadLetter]:
        """Messages the redrive policy moved to the DLQ (hidden for a minute while being handled)."""
        if not self.dlq_url:
            return []
        resp = self._sqs.receive_message(
            QueueUrl=self.dlq_url,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=max(0, min(MAX_WAIT_SECONDS, wait_seconds)),
            VisibilityTimeout=60,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return [DeadLetter(task_id=decode_body(m["Body"]), receipt=m["ReceiptHandle"],
                           receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
                           requeues=requeues_of(m["Body"]))
                for m in resp.get("Messages", [])]

    def requeue(self, task_id: str, requeues: int, interactive: bool = False) -> None:
        """Send a dead-lettered task that never ran back to its lane's queue."""
        self._send(self.lane_url(interactive), encode_body(task_id, requeues))

    def delete_dead_letter(self, lease: Lease) -> None:
        self._sqs.delete_message(QueueUrl=self.dlq_url, ReceiptHandle=lease.receipt)

    def size(self) -> int:
        """Messages waiting to be received (in-flight ones are running, not backlog), cached briefly."""
        with self._lock:
            fresh = self._cached_size is not None and time.monotonic() - self._cached_at < self._cache_seconds
            if fresh:
                return self._cached_size  # type: ignore[return-value]
        attrs = self._sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages"],
        )["Attributes"]
        size = int(attrs.get("ApproximateNumberOfMessages", 0))
        with self._lock:
            self._cached_size, self._cached_at = size, time.monotonic()
        return size

    def _adjust_cached_size(self, delta: int) -> None:
        # Keep this process's own sends/deletes in the cached count, so a burst of submits from one
        # API instance cannot overshoot the limit while the cache is fresh.
        with self._lock:
            if self._cached_size is not None:
                self._cached_size = max(0, self._cached_size + delta)

    def _change_visibility(self, lease: Lease, seconds: int) -> bool:
        """False when the receipt is stale."""
        try:
            self._sqs.change_message_visibility(
                QueueUrl=self._url_of(lease), ReceiptHandle=lease.receipt, VisibilityTimeout=seconds
            )
        except ClientError as exc:
            if error_code(exc) not in _STALE_RECEIPT:
                raise
            # The message was deleted or redelivered elsewhere; the store's attempt fence protects the result.
            log.warning("visibility change for %s ignored: receipt no longer valid", lease.task_id)
            return False
        if seconds == 0 and self._url_of(lease) == self.queue_url:
            self._adjust_cached_size(+1)  # a lapsed message is waiting again
        return True
