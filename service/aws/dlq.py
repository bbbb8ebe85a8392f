"""Dead letters: tasks whose message SQS moved to the DLQ after max_receives deliveries.

The redrive policy only moves the message; this marks the task failed with the reason, so a client
polling it sees `failed` instead of `queued`/`running` forever. Both lanes' queues (sqs_queue.py)
redrive here; a dead letter that never ran goes back to its own lane. Call it periodically from the worker
loop (every ~30 s is plenty); it is safe to run from several workers at once.
"""
from __future__ import annotations

import logging

from ..lanes import is_interactive
from ..ports import QUEUED, Backend, FailureReason
from ..records import TaskRecord
from .sqs_queue import DeadLetter, SqsTaskQueue

log = logging.getLogger(__name__)

MAX_REQUEUES = 3  # a task never claimed goes back to the queue this often before it is failed


def drain_dead_letters(backend: Backend, max_batches: int = 10) -> list[str]:
    """Mark every dead-lettered task failed and delete its message; returns the ids marked failed.

    A no-op (returns []) for backends without a dead-letter queue, e.g. embedded, whose SQLite
    queue applies max_receives itself.
    """
    queue = backend.queue
    if not isinstance(queue, SqsTaskQueue) or not queue.dlq_url:
        return []
    failed: list[str] = []
    for _ in range(max_batches):
        letters = queue.receive_dead_letters(max_messages=10)
        if not letters:
            break
        for letter in letters:
            try:
                if _handle(backend, queue, letter):
                    failed.append(letter.task_id)
            except Exception:  # one bad letter must not block the others; it is retried next drain
                log.exception("could not handle the dead letter of %s", letter.task_id)
    return failed


def _handle(backend: Backend, queue: SqsTaskQueue, letter: DeadLetter) -> bool:
    record = backend.store.get(letter.task_id)
    failed = False
    if record is not None and record.status == QUEUED and letter.requeues < MAX_REQUEUES:
        # Never claimed: every delivery ended before it ran (held for a worker's next batch when
        # that worker died, ...). SQS counted those receives; nothing ran, so it goes back.
        queue.requeue(letter.task_id, letter.requeues + 1, interactive=is_interactive(record.request))
        log.warning("task %s dead-lettered before it ever ran: queued again", letter.task_id)
    elif record is not None and backend.store.fail_unfinished(
            letter.task_id, dead_letter_reason(record, letter.receive_count), FailureReason.DEAD_LETTERED):
        failed = True
        log.warning("task %s dead-lettered after %d claims", letter.task_id, record.attempt)
        backend.task_ended(letter.task_id)  # fail_unfinished is true once, whichever worker drains: one webhook
    # Finished, expired or unknown tasks need nothing more: drop the message either way.
    queue.delete_dead_letter(letter)
    return failed


def dead_letter_reason(record: TaskRecord, dlq_receive_count: int) -> str:
    # attempt counts the deliveries that reached a worker's claim, less those handed back on purpose;
    # fall back to SQS's own count.
    deliveries = (record.attempt - record.given_back) or max(1, dlq_receive_count - 1)
    reason = f"dead-lettered after {deliveries} deliveries"
    if record.error:
        return f"{reason}: {record.error}"
    if record.attempt:
        return f"{reason}: the worker stopped each time; last seen at stage '{record.stage}' ({record.progress:.0%})"
    return f"{reason}: no worker could claim it"
