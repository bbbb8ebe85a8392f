"""Ghost tasks: queued in DynamoDB with no SQS message, left by a submitter that died between the two writes.

The intake creates a task marked unsent (schema.UNSENT_PART) and clears the mark once SQS took its
message. A mark older than the grace period belongs to a submitter that is gone (the API's requests
end long before it), so the reconciler sends the message itself: each mark is taken by one
conditional write (DynamoTaskStore.take_unsent), so of several workers running this at once one
sends, to the task's lane (service/lanes.py). Runs on the dead-letter drain's schedule (service/aws/__init__.py).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from ..lanes import is_interactive
from .dynamo_store import DynamoTaskStore
from .sqs_queue import SqsTaskQueue

log = logging.getLogger(__name__)

GRACE_SECONDS = 300.0  # past any submit's life: the API's Lambda and the embedded request deadlines are shorter
BATCH = 50


def resend_ghosts(store: DynamoTaskStore, queue: SqsTaskQueue, now: Optional[float] = None,
                  grace_seconds: float = GRACE_SECONDS) -> list[str]:
    """Send the message of every queued task left unsent past the grace period; returns the ids sent."""
    now = time.time() if now is None else now
    sent: list[str] = []
    for task_id, since in store.unsent_before(now - grace_seconds, BATCH):
        if not store.take_unsent(task_id, since, now):
            continue  # claimed, ended, or another reconciler took it first
        record = store.get(task_id)
        queue.send(task_id, interactive=record is not None and is_interactive(record.request))
        store.mark_sent(task_id, since=now)
        sent.append(task_id)
        log.warning("task %s was queued without a message for %.0f s (its submitter died): sent now",
                    task_id, now - since)
    return sent
