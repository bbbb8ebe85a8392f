"""Waiting for a task on behalf of an open HTTP request (the chat API answers when the song is done).

The task store is polled (every POLL_SECONDS; slower on DynamoDB). A wait ends when the task
finishes, when the client goes away, or at the API's wait limit (the task itself goes on then).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from starlette.concurrency import run_in_threadpool

from service.cancellation import cancel_task
from service.ports import Backend
from service.records import TERMINAL, TaskRecord

POLL_SECONDS = {"embedded": 0.25, "aws": 1.0}
DISCONNECT_REASON = "cancelled: the client of the chat completion disconnected"
# Set by acestep-api when it starts to shut down: a stream the server itself closes is no client
# that left, so its task is left to finish (the workers drain) and to /query_result.
server_stopping = threading.Event()
log = logging.getLogger(__name__)


@dataclass
class Tick:
    record: Optional[TaskRecord]  # None: the task is gone (expired or deleted)
    timed_out: bool = False

    @property
    def finished(self) -> bool:
        return self.record is None or self.record.status in TERMINAL


async def ticks(backend: Backend, task_id: str, max_wait: float, poll: Optional[float] = None) -> AsyncIterator[Tick]:
    """The task's record every poll until it finishes (last tick) or `max_wait` passes (timed_out)."""
    interval = poll if poll is not None else POLL_SECONDS.get(backend.name, 1.0)
    deadline = time.monotonic() + max_wait
    while True:
        record = await run_in_threadpool(backend.store.get, task_id)
        tick = Tick(record)
        if tick.finished:
            yield tick
            return
        if time.monotonic() >= deadline:
            yield Tick(record, timed_out=True)
            return
        yield tick
        await asyncio.sleep(interval)


def cancel_in_background(backend: Backend, task_id: str, on_cancelled: Callable[[str], None]) -> None:
    """From a request being torn down (no awaiting there): cancel the orphaned task in a thread."""
    if server_stopping.is_set():
        log.info("server stopping: chat task %s is left to finish (see /query_result)", task_id)
        return
    threading.Thread(target=cancel_task, args=(backend, task_id, DISCONNECT_REASON, on_cancelled),
                     name="cancel-orphan", daemon=True).start()


__all__ = ["DISCONNECT_REASON", "Tick", "cancel_in_background", "ticks"]
