"""Start-up objects are frozen out of the collector once every listener is up (entrypoints/heap.py)."""
from __future__ import annotations

import asyncio
import gc

from entrypoints import api_server


class _Listener:
    """The part of uvicorn.Server that _serve_all uses: serve(), then `started` once listening."""

    def __init__(self, frozen_at_start: list[int]):
        self.started = False
        self.frozen_at_start = frozen_at_start

    async def serve(self) -> None:
        await asyncio.sleep(0.01)
        self.frozen_at_start.append(gc.get_freeze_count())
        self.started = True
        await asyncio.sleep(0.2)  # serving


def test_heap_is_settled_after_every_listener_started():
    gc.unfreeze()
    try:
        seen: list[int] = []
        garbage = [[i] for i in range(1000)]  # long-lived objects built "at start-up"
        asyncio.run(api_server._serve_all([_Listener(seen), _Listener(seen)]))
        assert seen == [0, 0]  # nothing frozen while the listeners were starting
        assert gc.get_freeze_count() >= len(garbage)  # frozen once both were up
    finally:
        gc.unfreeze()
