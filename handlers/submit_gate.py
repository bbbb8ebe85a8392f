"""Whether the workers can take a new task, read at most once a second per API process.

Every submit asks two questions of the store: is some live worker able to run tasks (heartbeats),
and does one run the 5 Hz LM when the request needs it (the models meta). Under load that is two
extra reads and parses per submit for an answer that changes rarely. Only a confirmed "yes" (a
healthy live worker; a worker that reported an LM) is remembered, for ACCEPT_SECONDS: a refusal,
or a fleet that has not reported yet, is read again on the next submit, so a worker that comes
back is seen at once.
"""
from __future__ import annotations

import time
from typing import Optional

from service.format_via_worker import workers_run_lm
from service.observability.health import alive_only, healthy, unservable_reason
from service.ports import Backend

ACCEPT_SECONDS = 1.0


class SubmitGate:
    def __init__(self, backend: Backend, accept_seconds: float = ACCEPT_SECONDS):
        self.backend, self.accept_seconds = backend, accept_seconds
        self._workers_ok_until = 0.0
        self._lm_ok_until = 0.0

    def unservable_reason(self) -> Optional[str]:
        """health.unservable_reason, with a healthy live worker remembered for a moment."""
        now = time.monotonic()
        if now < self._workers_ok_until:
            return None
        alive = alive_only(self.backend.store.heartbeats(), time.time())
        if not alive:
            return None  # workers may be scaled to zero: accept, but look again next time
        if healthy(alive):
            self._workers_ok_until = now + self.accept_seconds
            return None
        return unservable_reason(self.backend)  # the rare refusal: read again for its wording

    def lm_served(self) -> bool:
        """format_via_worker.lm_served, with a worker's "I run the LM" remembered for a moment."""
        now = time.monotonic()
        if now < self._lm_ok_until:
            return True
        said = workers_run_lm(self.backend)  # one read for both answers
        if said is True:
            self._lm_ok_until = now + self.accept_seconds
        return said is not False
