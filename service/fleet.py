"""What the workers can do now, as the API sees it: the one place that answers "can a task run" and
"is the 5 Hz LM served".

The workers say it themselves: their heartbeats (alive, or failed to load their engine) and the models
meta the last one to start wrote (its models, device and LM). Under load each submit would read and
parse both for an answer that changes rarely, so a confirmed "yes" (a healthy live worker; a worker
that reported an LM) is remembered for `accept_seconds`. A refusal, or a fleet that has not reported
yet, is read again on the next ask, so a worker that comes back is seen at once.
"""
from __future__ import annotations

import time
from typing import Optional

from .observability.health import alive_only, healthy, unservable_reason
from .ports import Backend
from .records import MODELS_META_KEY, ModelsMeta

ACCEPT_SECONDS = 1.0


class Fleet:
    def __init__(self, backend: Backend, accept_seconds: float = ACCEPT_SECONDS):
        self.backend, self.accept_seconds = backend, accept_seconds
        self._workers_ok_until = 0.0
        self._lm_ok_until = 0.0

    def unservable_reason(self) -> Optional[str]:
        """Why no worker could run a new task (every live one failed to load its engine), or None.
        None too when no worker is alive: they may be scaled to zero and start on demand."""
        now = time.monotonic()
        if now < self._workers_ok_until:
            return None
        alive = alive_only(self.backend.store.heartbeats(), time.time())
        if not alive:
            return None  # accept, but look again next time
        if healthy(alive):
            self._workers_ok_until = now + self.accept_seconds
            return None
        return unservable_reason(self.backend)  # the rare refusal: read again for its wording

    def runs_lm(self) -> Optional[bool]:
        """Whether the workers run the 5 Hz LM: True or False as they last said; None before any has
        reported (they may be scaled to zero)."""
        now = time.monotonic()
        if now < self._lm_ok_until:
            return True
        meta = ModelsMeta.parse(self.backend.store.get_meta(MODELS_META_KEY))
        said = None if meta is None else meta.lm_model not in (None, "", "none")
        if said:
            self._lm_ok_until = now + self.accept_seconds
        return said


__all__ = ["ACCEPT_SECONDS", "Fleet"]
