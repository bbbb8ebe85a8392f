"""Running a batch: one engine call, watched (service/run_watch.py) for progress, cancellation and a hang.

Gives each task's outcome, or None when there is nothing left to record: the tasks were handed back
(shutdown), cancelled or taken over meanwhile, or the engine hung and their leases lapsed.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence

from engine.types import GenerationCancelled

from .config import Settings
from .ports import Backend, GenerationEngine, Lease
from .records import CANCELLED, FailureReason
from .run_watch import GenerationTimedOut, RunWatch, TasksGone
from .task_errors import TaskFailure
from .worker_batch import ClaimedTask
from .worker_outcomes import Outcome, OutcomeRecorder

log = logging.getLogger(__name__)


class BatchRun:
    def __init__(self, settings: Settings, backend: Backend, engine: GenerationEngine, recorder: OutcomeRecorder,
                 cancel_event: threading.Event, on_stalled: Optional[Callable[[], None]] = None):
        self.settings, self.backend, self.engine, self.recorder = settings, backend, engine, recorder
        self.cancel_event = cancel_event  # abandon the running batch (hand its tasks back)
        self.on_stalled = on_stalled  # a generation is hung; the CLI exits here
        self.watch: Optional[RunWatch] = None  # the engine call in progress, for the heartbeat

    def generate(self, batch: Sequence[ClaimedTask], keep_alive: Sequence[Lease] = (),
                 encode: bool = True) -> Optional[list[Outcome]]:
        """The engine's outcome per task, or None when there is nothing to record (released, hung).
        `keep_alive`: leases held for later whose visibility is extended meanwhile."""
        started = time.monotonic()
        watch = RunWatch(self.backend, [(c.lease, c.attempt) for c in batch], keep_alive=list(keep_alive),
                         visibility_timeout=self.settings.visibility_timeout,
                         generation_timeout=self.settings.generation_timeout,
                         stall_timeout=self.settings.stall_timeout, cancel_event=self.cancel_event,
                         on_stalled=lambda: self._stalled(batch))
        self.watch = watch
        outcomes: Optional[list[Outcome]]
        with watch:
            try:
                if len(batch) == 1:
                    c = batch[0]
                    outcomes = [self.engine.generate(
                        c.request, src_audio=c.inputs.get("src_audio"),
                        reference_audio=c.inputs.get("reference_audio"), progress=watch, encode=encode)]
                else:
                    outcomes = list(self.engine.generate_batch([(c.request, c.inputs) for c in batch],
                                                               progress=watch, encode=encode))
            except GenerationTimedOut as exc:
                outcomes = [TaskFailure(str(exc), FailureReason.GENERATION_TIMEOUT)] * len(batch)
            except TasksGone:
                self._drop_gone(batch)
                outcomes = None
            except GenerationCancelled:
                for c in batch:
                    log.info("released %s for another worker (shutting down)", c.task_id)
                    self.recorder.give_back(c)
                outcomes = None
            except Exception as exc:  # an engine crash fails these tasks, with the reason
                log.exception("engine failed")
                outcomes = [exc] * len(batch)
            finally:
                self.watch = None
        if watch.stalled:  # the leases lapsed and the tasks may run elsewhere now: keep nothing
            log.warning("a hung generation returned after %.0f s; its tasks were left to other workers",
                        time.monotonic() - started)
            return None
        if outcomes is not None:
            log.info("ran %d task(s) in %.2fs", len(batch), time.monotonic() - started)
        return outcomes

    def _stalled(self, batch: Sequence[ClaimedTask]) -> None:
        """The engine call is hung (run_watch). A task on its last delivery fails now with the timeout
        as its reason; the others' leases lapse so another worker retries them. Then the CLI exits."""
        for c in batch:
            # This delivery included. Each count can run high on one backend (duplicate SQS messages
            # add claims; unclaimed receives add to the embedded count), never both: the lower is right.
            lost = min(c.attempt - c.given_back, c.lease.receive_count)
            if lost >= self.settings.max_receives:
                self.recorder.fail(c, f"generation timed out: no progress for {self.settings.stall_timeout:g} s "
                                   f"(ACESTEP_STALL_TIMEOUT) on {lost} deliveries", FailureReason.STALL_TIMEOUT)
        if self.on_stalled is not None:
            self.on_stalled()

    def _drop_gone(self, batch: Sequence[ClaimedTask]) -> None:
        """The engine stopped because no task of the batch is ours: ack the cancelled ones; a task
        another attempt holds now is left to that attempt's lease."""
        records = self.backend.store.get_many([c.task_id for c in batch])
        for c in batch:
            record = records.get(c.task_id)
            if record is None or record.status == CANCELLED:
                log.info("task %s was cancelled: stopped its generation", c.task_id)
                self.backend.queue.ack(c.lease)
            else:
                log.warning("task %s is held by attempt %d now: stopped ours (%d)", c.task_id, record.attempt,
                            c.attempt)
