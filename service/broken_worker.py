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
from .ports import Backend
from .records import FailureReason, StoredRequestInvalid, WorkerHeartbeat

log = logging.getLogger(__name__)

NOT_LOADED = "no worker can run this task: the worker could not load its models ({error})"


class BrokenWorker:
    def __init__(self, settings: Settings, backend: Backend, error: str, worker_id: Optional[str] = None,
                 on_finished: Optional[Callable[[str], None]] = None):
        self.settings, self.backend, self.error = settings, backend, error
        self.on_finished = on_finished  # a task this worker failed (webhooks), as for Worker; must not block
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
        message = NOT_LOADED.format(error=self.error)
        try:
            record = self.backend.store.claim(lease.task_id, self.worker_id)
        except StoredRequestInvalid as exc:  # it could not run anywhere: say so rather than blame this worker
            if self.backend.store.fail_unfinished(lease.task_id, str(exc), FailureReason.INVALID_REQUEST):
                self._finished(lease.task_id)
            record = None
        if record is not None:
            with log_context(task_id=record.task_id, attempt=record.attempt):
                log.warning("task %s failed: %s", record.task_id, message)
                if self.backend.store.finish(record.task_id, record.attempt, error=message,
                                             reason=FailureReason.ENGINE_LOAD_FAILED):
                    self._finished(record.task_id)
        self.backend.queue.ack(lease)
        return True

    def _finished(self, task_id: str) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(task_id)
            except Exception:  # a notification must never stop this worker failing the others
                log.warning("could not queue the webhook of %s", task_id, exc_info=True)

    def _working_worker_alive(self) -> bool:
        alive = alive_only(self.backend.store.heartbeats(), time.time())
        return bool(healthy([b for b in alive if b.worker_id != self.worker_id]))
