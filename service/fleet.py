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
from .config import Settings
from .model_set import WantedModels, read_wanted
from .ports import Backend
from .records import MODELS_META_KEY, ModelsMeta, WorkerHeartbeat

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


def served_model_names(settings: Settings, backend: Backend) -> list[str]:
    """The DiT models requests may name, the first the default: the start-up settings' (ACESTEP_CONFIG_PATH*),
    or once POST /v1/init has asked for another set (one machine), what the workers serve now: the newest live
    worker's heartbeat, else what the last one to load published. A wish still loading or failed changes nothing."""
    if backend.name == "aws" or read_wanted(backend.store, settings) is None:
        return list(settings.model_names)  # one read, and none on AWS: the set there is the deploy's
    beats = [b for b in healthy(alive_only(backend.store.heartbeats(), time.time())) if b.models]
    if beats:
        return list(max(beats, key=lambda b: b.beat_at).models)
    meta = ModelsMeta.parse(backend.store.get_meta(MODELS_META_KEY))
    return [m.name for m in meta.models] if meta and meta.models else list(settings.model_names)


def switch_state(settings: Settings, backend: Backend) -> Optional[dict[str, object]]:
    """Where the last POST /v1/init wish stands on the live workers, or None (none made under these settings):
    state "loaded" (every live worker serves it), "failed" (a worker could not load it: `errors`; it serves its
    old set), "loading", or "waiting" (no worker is alive: the next one to start loads it)."""
    wanted = read_wanted(backend.store, settings) if backend.name != "aws" else None
    if wanted is None:
        return None
    live = healthy(alive_only(backend.store.heartbeats(), time.time()))
    return _state(wanted, live)


def _state(wanted: WantedModels, live: list[WorkerHeartbeat]) -> dict[str, object]:
    answered = [b for b in live if b.models_version >= wanted.version and not b.models_loading]
    errors = {b.worker_id: b.models_error for b in answered if b.models_version == wanted.version and b.models_error}
    state = ("waiting" if not live else "failed" if errors else
             "loaded" if len(answered) == len(live) else "loading")
    return {"state": state, "version": wanted.version, "models": wanted.models, "lm": wanted.lm,
            "lm_model": wanted.lm_model, "lm_backend": wanted.lm_backend, "requested_at": wanted.requested_at,
            "errors": errors, "loading_workers": [b.worker_id for b in live if b.models_loading]}


def _runs(lm_model: Optional[str]) -> bool:
    return lm_model not in (None, "", "none")


__all__ = ["ACCEPT_SECONDS", "Fleet", "served_model_names", "switch_state"]
