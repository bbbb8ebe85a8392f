"""What the workers can do now, as the API sees it: the one place that answers "can a task run" and
"is the 5 Hz LM served".

The workers say it themselves, in their heartbeats: alive or not, failed to load their engine, and the
LM each runs. While none is alive (scaled to zero) the fleet is what it last said: the newest heartbeat
kept (a day), else the models meta the last worker to start wrote. Under load each submit would read
and parse these for an answer that changes rarely, so a confirmed "yes" (a healthy live worker; an LM
served) is remembered for `accept_seconds`. A refusal, or a fleet that has not reported yet, is read
again on the next ask, so a worker that comes back is seen at once.
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
        said = self._lm_in_heartbeats()
        if said is None:  # no worker's heartbeat says (older workers): what the last one to start published
            meta = ModelsMeta.parse(self.backend.store.get_meta(MODELS_META_KEY))
            said = None if meta is None else _runs(meta.lm_model)
        if said:
            self._lm_ok_until = now + self.accept_seconds
        return said

    def _lm_in_heartbeats(self) -> Optional[bool]:
        """Some healthy live worker runs the LM; else, none alive, whether the newest beat's did."""
        beats = [b for b in self.backend.store.heartbeats() if b.lm_model is not None]
        alive = healthy(alive_only(beats, time.time()))
        if alive:
            return any(_runs(b.lm_model) for b in alive)
        newest = max(beats, key=lambda b: b.beat_at, default=None)
        return None if newest is None else _runs(newest.lm_model)


def _runs(lm_model: Optional[str]) -> bool:
    return lm_model not in (None, "", "none")


__all__ = ["ACCEPT_SECONDS", "Fleet"]
