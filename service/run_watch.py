"""Watching one engine call: throttled progress writes, cancellation, the deadline and the leases.

The engine reports progress through a callback; the watch turns that into store writes (a few per
task, not one per diffusion step) and is also the point where a call is stopped: at shutdown
(GenerationCancelled), past ACESTEP_GENERATION_TIMEOUT (GenerationTimedOut), or once the store
refuses every task's progress because the client cancelled it (TasksGone), at most
PROGRESS_MIN_SECONDS after the cancel.

Leases are extended only while the engine makes progress. A call that has reported nothing for
ACESTEP_STALL_TIMEOUT is hung: its leases lapse so the queue redelivers the tasks to another
worker, and `on_stalled` runs (the worker CLI exits there, to be restarted).
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Callable, Optional

from engine.types import GenerationCancelled

from .ports import Backend, Lease
from .records import RUNNING

log = logging.getLogger(__name__)

# A store write per diffusion step would dominate small tasks.
PROGRESS_MIN_DELTA = 0.05
PROGRESS_MIN_SECONDS = 0.5


class GenerationTimedOut(GenerationCancelled):
    """Raised from the progress callback once the task is past its deadline."""


class TasksGone(GenerationCancelled):
    """Raised from the progress callback once no task of the call is this worker's any more:
    cancelled by the client, or fenced out by a newer attempt (the store refused the progress)."""


class RunWatch:
    def __init__(self, backend: Backend, tasks: list[tuple[Lease, int]], *, visibility_timeout: float,
                 generation_timeout: float, stall_timeout: float, cancel_event: threading.Event,
                 on_progress: Optional[Callable[[], None]] = None,
                 on_stalled: Optional[Callable[[], None]] = None, keep_alive: Optional[list[Lease]] = None):
        self.backend, self.tasks = backend, tasks
        # Leases this worker holds for a later round (unclaimed): kept hidden while this call runs.
        self.keep_alive = list(keep_alive or [])
        self.visibility_timeout = visibility_timeout
        self.generation_timeout = generation_timeout
        self.stall_timeout = stall_timeout
        self.cancel_event = cancel_event
        self.on_progress, self.on_stalled = on_progress, on_stalled
        self.started = time.monotonic()
        self.last_progress = self.started
        self.stalled = False
        self.gone: set[str] = set()  # tasks whose progress the store refused (cancelled / fenced out)
        self._written = (-1.0, "", 0.0)  # value, stage, time of the last store write
        self._done = threading.Event()
        # The keeper logs about these tasks: it runs in a copy of the caller's log context.
        self._keeper = threading.Thread(target=contextvars.copy_context().run, args=(self._keep_leases,),
                                        name="lease-keeper", daemon=True)

    # -- the engine's progress callback -------------------------------------------------------

    def __call__(self, fraction: float, stage: str) -> None:
        if self.cancel_event.is_set():
            raise GenerationCancelled("worker is shutting down")
        now = time.monotonic()
        self.last_progress = now
        if now - self.started > self.generation_timeout:
            raise GenerationTimedOut(self.timeout_message())
        if self.on_progress is not None:
            self.on_progress()
        value, last_stage, at = self._written
        if stage == last_stage and fraction - value < PROGRESS_MIN_DELTA and now - at < PROGRESS_MIN_SECONDS:
            return
        self._written = (fraction, stage, now)
        for lease, attempt in self.tasks:
            if lease.task_id not in self.gone and \
                    not self.backend.store.update_progress(lease.task_id, attempt, round(fraction, 3), stage):
                self.gone.add(lease.task_id)
        if len(self.gone) == len(self.tasks):  # nobody wants this output: free the GPU now
            raise TasksGone(f"task(s) {', '.join(sorted(self.gone))} cancelled or taken over")

    def timeout_message(self) -> str:
        return (f"generation timed out after {time.monotonic() - self.started:.0f} s "
                f"(the limit is {self.generation_timeout:g} s, ACESTEP_GENERATION_TIMEOUT)")

    # -- leases ---------------------------------------------------------------------------------

    def __enter__(self) -> "RunWatch":
        self._keeper.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._keeper.join()

    def _keep_leases(self) -> None:
        interval = max(0.05, min(self.visibility_timeout, self.stall_timeout) / 3)
        while not self._done.wait(interval):
            if time.monotonic() - self.last_progress > self.stall_timeout:
                self._stall()
                return
            extend_held(self.backend, self.tasks, self.keep_alive, self.visibility_timeout)

    def _stall(self) -> None:
        self.stalled = True
        log.error("no progress from the engine for %.0f s (ACESTEP_STALL_TIMEOUT): the generation of %s is "
                  "hung; its lease(s) will lapse and another worker will take it",
                  time.monotonic() - self.last_progress, ", ".join(lease.task_id for lease, _ in self.tasks))
        if self.on_stalled is not None:
            self.on_stalled()


def extend_held(backend: Backend, tasks: list[tuple[Lease, int]], unclaimed: list[Lease],
                visibility_timeout: float) -> None:
    """Extend the leases of `tasks` whose attempt is still current (still_held) and the `unclaimed`
    ones; one that fails is logged and the others still extended."""
    for lease in still_held(backend, tasks) + unclaimed:
        try:
            backend.queue.extend(lease, visibility_timeout)
        except Exception:  # a missed extension only risks a redelivery, which is fenced
            log.exception("could not extend lease of %s", lease.task_id)


def still_held(backend: Backend, tasks: list[tuple[Lease, int]]) -> list[Lease]:
    """The leases whose attempt is still the task's current one (one store read for them all).

    A lease lost to a newer attempt is not extended: on SQS its old receipt could otherwise keep
    the new holder's message hidden after that holder died."""
    if not tasks:
        return []
    try:
        records = backend.store.get_many([lease.task_id for lease, _ in tasks])
    except Exception:
        log.exception("could not read the running tasks; extending their leases anyway")
        return [lease for lease, _ in tasks]
    held = []
    for lease, attempt in tasks:
        record = records.get(lease.task_id)
        if record is not None and record.status == RUNNING and record.attempt == attempt:
            held.append(lease)
    return held
