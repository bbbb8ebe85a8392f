"""uvicorn's h11 protocol with a deadline for each request head, and a cap on connections waiting for one.

uvicorn closes an idle keep-alive connection, but one that has sent part of a request head waits
forever (any byte cancels the keep-alive timer): a few hundred such connections (slowloris) hold
every file descriptor and the next request, /health included, cannot be accepted. Here a
connection must complete each request head within `header_timeout` seconds of connecting or of
its previous response, and at most `max_waiting` connections of the process (both listeners
together) may be waiting for a head at once: beyond that the one waiting longest is closed (a
real client sends its head at once, so it is the oldest waiter that is likely hostile).

The body has its own deadline in the app (handlers/body.py, BODY_READ_TIMEOUT).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds to send a request head (after connecting or after the last response)
MAX_WAITING = 256  # connections of the process waiting for a request head
MAX_HEAD_BYTES = 16 * 1024  # h11_max_incomplete_event_size: a longer request head is a 400


def header_limited(header_timeout: float = HEADER_TIMEOUT, max_waiting: int = MAX_WAITING) -> type[H11Protocol]:
    """A protocol class for uvicorn.Config(http=...); give every listener of the process the same one."""
    waiting: "OrderedDict[HeaderLimitedH11, None]" = OrderedDict()  # oldest first

    class HeaderLimitedH11(H11Protocol):
        _head_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request at once
            if not self.transport.is_closing() and not self._in_request():
                self._await_head()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _await_head(self) -> None:
            self._stop_waiting()
            waiting[self] = None
            self._head_timer = self.loop.call_later(header_timeout, self._close_waiting)
            while len(waiting) > max_waiting:
                oldest = next(iter(waiting))
                oldest._close_waiting()

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _close_waiting(self) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                self.transport.close()

    HeaderLimitedH11.waiting = waiting  # type: ignore[attr-defined]  # for tests and metrics
    return HeaderLimitedH11


__all__ = ["HEADER_TIMEOUT", "MAX_HEAD_BYTES", "MAX_WAITING", "header_limited"]
