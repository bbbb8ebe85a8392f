"""The heartbeat loop: a worker's state written to the store every few seconds until it stops."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..ports import TaskStore
from ..records import WorkerHeartbeat

log = logging.getLogger(__name__)


class HeartbeatLoop:
    def __init__(self, store: TaskStore, beat: Callable[[], WorkerHeartbeat], interval: float,
                 stop_event: threading.Event, also: Optional[Callable[[], None]] = None):
        self.store, self.beat, self.interval, self.stop_event, self.also = store, beat, interval, stop_event, also
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> "HeartbeatLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        """Called once stop_event is set: wait for the last beat, then remove this worker's entry."""
        self._thread.join(timeout=self.interval)
        try:
            self.store.forget_heartbeat(self.beat().worker_id)
        except Exception:
            log.warning("could not remove this worker's heartbeat", exc_info=True)

    def _run(self) -> None:
        while True:
            try:
                self.store.record_heartbeat(self.beat())
                if self.also is not None:
                    self.also()
            except Exception:  # a missed beat only makes /health cautious
                log.warning("heartbeat failed", exc_info=True)
            if self.stop_event.wait(self.interval):
                return
