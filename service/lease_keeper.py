"""Keeps the leases of tasks that wait outside an engine call (in the worker's post-processing
stage) hidden from other workers until they are recorded and acked.

Claimed tasks are extended only while their attempt still holds them (run_watch.still_held: the
same fencing as during generation); a lease held but not claimed yet (attempt None: the task
carried to the next round) is extended as it is.
"""
from __future__ import annotations

import contextvars
import logging
import threading
from typing import Optional

from .ports import Backend, Lease
from .run_watch import extend_held

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, backend: Backend, visibility_timeout: float):
        self.backend = backend
        self.visibility_timeout = visibility_timeout
        self.interval = max(0.05, visibility_timeout / 3)
        self._held: dict[str, tuple[Lease, Optional[int]]] = {}  # receipt -> (lease, attempt or None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def add(self, lease: Lease, attempt: Optional[int]) -> None:
        with self._lock:
            self._held[lease.receipt] = (lease, attempt)
            if self._thread is None:
                self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                                name="post-lease-keeper", daemon=True)
                self._thread.start()

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(lease.receipt, None)

    def leases(self) -> list[Lease]:
        with self._lock:
            return [lease for lease, _ in self._held.values()]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.extend_now()

    def extend_now(self) -> None:
        # Under the lock: once remove() returns, its lease is not extended again, so a release (give
        # back) that follows is not undone by a late extension.
        with self._lock:
            entries = list(self._held.values())
            claimed = [(lease, attempt) for lease, attempt in entries if attempt is not None]
            unclaimed = [lease for lease, attempt in entries if attempt is None]
            extend_held(self.backend, claimed, unclaimed, self.visibility_timeout)
