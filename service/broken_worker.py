"""A worker whose engine could not load: it says why, and does not leave tasks waiting for ever.

Exiting would crash-loop (the launcher or ECS restarts it) while tasks sit "queued" with nobody
saying why. Instead the process stays up: its heartbeat carries state "failed" and the load error,
which /health reports and /release_task uses to refuse new work; and while no working worker is
alive it takes the waiting tasks and fails each with that error.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from .config import Settings
from .observability.health import FAILED_STATE, HEARTBEAT_SECONDS, alive_only, healthy
from .observability.heartbeat import HeartbeatLoop
from .observability.logs import log_context
from .observability.metrics import MetricsSink
from .ports import Backend
from .records import FailureReason, WorkerHeartbeat
from .worker_outcomes import HeldTask, OutcomeRecorder

log = logging.getLogger(__name__)

NOT_LOADED = "no worker can run this task: the worker could not load its models ({error})"


class BrokenWorker:
    def __init__(self, settings: Settings, backend: Backend, error: str, worker_id: Optional[str] = None,
                 on_finished: Optional[Callable[[str], None]] = None, metrics: Optional[MetricsSink] = None):
        self.settings, self.backend, self.error = settings, backend, error
        # on_finished: a task this worker failed (webhooks), as for Worker; must not block
        self.recorder = OutcomeRecorder(backend, metrics, on_finished)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        self.heartbeat_seconds = HEARTBEAT_SECONDS
        self.heartbeat_file: Optional[str] = None  # healthy while it beats: it stays up to say why
        self.stop_event = threading.Event()

    def heartbeat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(worker_id=self.worker_id, started_at=self.started_at, beat_at=time.time(),
                               state=FAILED_STATE, error=self.error)

    def request_stop(self, cancel_running: bool = False) -> None:
        self.stop_event.set()

    def run_forever(self, poll_seconds: float = 5.0) -> None:
        with log_context(worker_id=self.worker_id), \
                HeartbeatLoop(self.backend.store, self.heartbeat, self.heartbeat_seconds, self.stop_event,
                              file=self.heartbeat_file):
            log.error("worker %s cannot load its models and serves none: %s", self.worker_id, self.error)
            while not self.stop_event.is_set():
                try:
                    if not self.run_once(poll_seconds):
                        self.stop_event.wait(poll_seconds)
                except Exception:
                    log.exception("broken-worker loop error")
                    self.stop_event.wait(1.0)

    def run_once(self, wait_seconds: float) -> bool:
        """Fail one waiting task with the load error, unless a working worker can run it. False: none."""
        if self._working_worker_alive():
            return False
        lease = self.backend.queue.receive(wait_seconds, self.settings.visibility_timeout)
        if lease is None:
            return False
        record = self.recorder.claim(lease, self.worker_id)  # an unparsable request fails as that, not as ours
        if record is None:
            return True
        with log_context(task_id=record.task_id, attempt=record.attempt):
            self.recorder.fail(HeldTask(lease, record.attempt, record.created_at, record.started_at),
                               NOT_LOADED.format(error=self.error), FailureReason.ENGINE_LOAD_FAILED)
        return True

    def _working_worker_alive(self) -> bool:
        alive = alive_only(self.backend.store.heartbeats(), time.time())
        return bool(healthy([b for b in alive if b.worker_id != self.worker_id]))
