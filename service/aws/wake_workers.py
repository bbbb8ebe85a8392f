"""Scale from zero: a submitted task wakes the ECS worker service when it runs no task.

The backlog alarm scales the service on SQS metrics, but SQS emits nothing for a queue that has
been idle for hours, so the first task after a quiet spell would wait minutes extra for the alarm.
The API therefore sets the service's desired count to 1 itself when it is at 0 (the alarm takes
over from there, up and down). One DescribeServices per API instance per `recheck_seconds` at most.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class EcsWorkerWaker:
    def __init__(self, client_factory: Callable[[], Any], cluster: str, service: str,
                 recheck_seconds: float = 30.0):
        self._client_factory = client_factory  # the ECS client is built on first use (Lambda cold start)
        self._client: Any = None
        self.cluster, self.service = cluster, service
        self.recheck_seconds = recheck_seconds
        self._lock = threading.Lock()
        self._checked_at: float | None = None

    def __call__(self) -> bool:
        """Called after each new task is queued; True when this call started the service."""
        with self._lock:
            now = time.monotonic()
            if self._checked_at is not None and now - self._checked_at < self.recheck_seconds:
                return False
            self._checked_at = now
        try:
            return self._wake()
        except Exception:  # the task is queued either way; the backlog alarm is the fallback
            log.warning("could not check or start the worker service %s", self.service, exc_info=True)
            return False

    def _wake(self) -> bool:
        ecs = self._ecs()
        found = ecs.describe_services(cluster=self.cluster, services=[self.service]).get("services", [])
        if not found:
            log.warning("worker service %s not found in cluster %s", self.service, self.cluster)
            return False
        if int(found[0].get("desiredCount", 0)) >= 1:
            return False
        ecs.update_service(cluster=self.cluster, service=self.service, desiredCount=1)
        log.info("no worker was running: set %s's desired count to 1", self.service)
        return True

    def _ecs(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client
