"""CPU work on a request's input (JSON, validation, base64), kept off the event loop.

Both APIs of a process share one event loop (entrypoints/api_server.py): a request that parses
for a second on it stalls every other request, /health on the other port included. Small inputs
parse inline (a thread hop costs more than the work); larger ones go to a few threads, so a burst
of big bodies queues for them instead of taking every thread of the default pool. A thread still
shares the GIL, which is why the inputs are also bounded in size and every parser here is linear.
"""
from __future__ import annotations

import asyncio
import functools
import weakref
from typing import Callable, ParamSpec, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")
P = ParamSpec("P")

INLINE_BYTES = 64 * 1024  # below this, parsing costs well under a millisecond: no thread
PARSE_THREADS = 2
_limiters: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter]" = \
    weakref.WeakKeyDictionary()


def _limiter() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(PARSE_THREADS)
    return limiter


async def parse_off_loop(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs), on a parse thread when the input is `size` bytes or more."""
    call = functools.partial(fn, *args, **kwargs)
    if size < INLINE_BYTES:
        return call()
    return await anyio.to_thread.run_sync(call, limiter=_limiter())


__all__ = ["INLINE_BYTES", "PARSE_THREADS", "parse_off_loop"]
