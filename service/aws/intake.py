"""TaskIntake on DynamoDB + SQS: create the task, then send its message; undo the task if the send fails.

The two services cannot share a transaction. A task is created marked unsent and the mark is cleared
once SQS took its message; a submit that dies between the two writes leaves the mark, and the
reconciler (ghosts.py) sends the message after a grace period.
LM-only tasks go to the interactive lane's queue where there is one (service/lanes.py, sqs_queue.py).
After a new task is queued, `on_queued` runs (the worker-service waker, see wake_workers.py).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from ..idempotency import replayed
from ..lanes import is_interactive
from ..ports import CallerLimits, TaskIntake, TaskRecord
from .dynamo_store import DynamoTaskStore, IdempotencyKeyTaken
from .sqs_queue import SqsTaskQueue

log = logging.getLogger(__name__)


class AwsTaskIntake(TaskIntake):
    def __init__(self, store: DynamoTaskStore, queue: SqsTaskQueue,
                 on_queued: Optional[Callable[[], object]] = None):
        self.store, self.queue, self.on_queued = store, queue, on_queued

    def submit(self, record: TaskRecord, max_queue: int,
               caller_limits: Optional[CallerLimits] = None) -> tuple[TaskRecord, bool]:
        key = record.idempotency_key
        if key:
            first = self.store.find_by_idempotency_key(key)
            if first is not None:
                return replayed(record, first), False
        try:
            # The key's mapping and the queue limit are checked in the same transaction.
            self.store.create(record, max_queued=max_queue, caller_limits=caller_limits)
        except IdempotencyKeyTaken:  # a concurrent submit with the same key won the race
            first = self.store.find_by_idempotency_key(key or "")
            if first is None:
                raise
            return replayed(record, first), False
        try:
            self.queue.send(record.task_id, interactive=is_interactive(record.request))
        except BaseException:
            self.store.delete(record.task_id)
            raise
        try:
            self.store.mark_sent(record.task_id)
        except Exception:  # the task is queued with its message; at worst the reconciler sends a second one
            log.exception("could not mark task %s sent", record.task_id)
        if self.on_queued is not None:
            self.on_queued()
        return record, True
