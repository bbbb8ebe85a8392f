"""Waiting on the event loop for something a worker writes to the store.

A request that waits for a worker must not hold a thread for the whole wait: a burst of them would take
every thread of the pool that all blocking calls share (submits, polls, /health's store reads) and stall
the whole API. Here the wait is an asyncio sleep; each store read is one short call in a thread, and the
reads back off, so a waiter costs little between them.
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable, Optional, TypeVar

import anyio
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")

FIRST_DELAY = 0.05  # answers that come quickly are seen quickly...
MAX_DELAY = 0.5  # ...and a long wait reads the store twice a second
BACKOFF = 1.5


async def poll(read: Callable[[], Optional[T]], timeout: float,
               gone: Optional[Callable[[], Awaitable[bool]]] = None) -> Optional[T]:
    """read()'s first value other than None, or None once `timeout` seconds pass or `gone()` says the
    caller left. Exceptions from read() propagate."""
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while True:
        value = await run_in_threadpool(read)
        if value is not None:
            return value
        left = deadline - time.monotonic()
        if left <= 0 or (gone is not None and await gone()):
            return None
        await anyio.sleep(min(delay, left))
        delay = min(delay * BACKOFF, MAX_DELAY)


async def finally_in_thread(fn: Callable[[], T]) -> T:
    """fn() in a thread even while the awaiting task is being cancelled (a clean-up that must happen)."""
    with anyio.CancelScope(shield=True):
        result = await run_in_threadpool(fn)
    return result


__all__ = ["poll", "finally_in_thread"]
