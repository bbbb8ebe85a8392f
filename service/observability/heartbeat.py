"""The heartbeat loop: a worker's state written to the store every few seconds until it stops."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..ports import TaskStore
from ..records import WorkerHeartbeat
from .heartbeat_file import write_beat

log = logging.getLogger(__name__)


class HeartbeatLoop:
    def __init__(self, store: TaskStore, beat: Callable[[], WorkerHeartbeat], interval: float,
                 stop_event: threading.Event, also: Optional[Callable[[], None]] = None,
                 file: Optional[str] = None):
        self.store, self.beat, self.interval, self.stop_event, self.also = store, beat, interval, stop_event, also
        self.file = file  # also written locally for the container health check (heartbeat_file.py)
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> "HeartbeatLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Called once stop_event is set: wait for the last beat, then remove this worker's entry."""
        self._thread.join(timeout=self.interval)
        try:
            self.store.forget_heartbeat(self.beat().worker_id)
        except Exception:
            log.warning("could not remove this worker's heartbeat", exc_info=True)

    def _run(self) -> None:
        while True:
            beat = self.beat()
            if self.file:  # first: the process is alive even when the store is not reachable
                try:
                    write_beat(self.file, beat)
                except OSError:
                    log.warning("could not write the heartbeat file %s", self.file, exc_info=True)
            try:
                self.store.record_heartbeat(beat)
                if self.also is not None:
                    self.also()
            except Exception:  # a missed beat only makes /health cautious
                log.warning("heartbeat failed", exc_info=True)
            if self.stop_event.wait(self.interval):
                return
