"""The server's default adapters: what a request that names no adapter gets (upstream's /v1/lora/* state).

Upstream's server holds one adapter state in its process. Here it is a small record in the task store (meta
DEFAULTS_META_KEY, SQLite or DynamoDB), and the API writes it into each request that names no adapter at submit
(service/adapter_resolution.py): the stored task says what ran, and every worker of the fleet applies the
state that was current when the task was submitted, without a state of its own to keep in step.

Two changes at the same moment from two API processes both land: each is a conditional write over the version
it read, redone on the other's result when it lost (adapter_meta.update_meta).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, TypeVar

from pydantic import BaseModel, Field, ValidationError

from engine.request import ADAPTER_SCALE_MAX, ADAPTER_SCALE_MIN, MAX_ADAPTERS, AdapterRef

from .adapter_catalog import AdapterCatalog, AdapterEntry, mismatch
from .adapter_meta import update_meta
from .config import Settings
from .ports import TaskStore
from .refusals import AdapterRejected

DEFAULTS_META_KEY = "adapters_default"
T = TypeVar("T")
FRESH_SECONDS = 1.0  # a submit reads the record at most this often per API process
# The inner parts of what upstream's trainer writes: `<output>/final/adapter_model.safetensors` is adapter <output>.
TRAINER_PARTS = ("final", "adapter_model.safetensors", "adapter_config.json", "lokr_weights.safetensors")


class DefaultAdapter(BaseModel):
    name: str  # the adapter's name in the catalog
    scale: float = Field(1.0, ge=ADAPTER_SCALE_MIN, le=ADAPTER_SCALE_MAX)
    label: Optional[str] = None  # upstream's `adapter_name` given at load (what /v1/lora/scale may call it)
    kind: Optional[str] = None  # lora | lokr, for /v1/lora/status

    @property
    def called(self) -> str:
        return self.label or self.name


class DefaultAdapters(BaseModel):
    adapters: list[DefaultAdapter] = []
    use_lora: bool = True  # /v1/lora/toggle: off keeps them loaded but applies none
    updated_at: Optional[float] = None

    def refs(self) -> list[AdapterRef]:
        if not self.use_lora:
            return []
        return [AdapterRef(name=a.name, scale=a.scale, sha256=None) for a in self.adapters]


def _parsed(stored: Optional[dict[str, Any]]) -> DefaultAdapters:
    try:
        return DefaultAdapters.model_validate(stored or {})
    except ValidationError:
        return DefaultAdapters()  # a record no version of this code wrote: as if none were loaded


class DefaultAdapterState:
    def __init__(self, settings: Settings, store: TaskStore, catalog: AdapterCatalog,
                 fresh_seconds: float = FRESH_SECONDS):
        self.settings, self.store, self.catalog = settings, store, catalog
        self.fresh_seconds = fresh_seconds
        self._lock = threading.Lock()
        self._cached: Optional[DefaultAdapters] = None
        self._until = 0.0

    def current(self, *, fresh: bool = False) -> DefaultAdapters:
        now = time.monotonic()
        with self._lock:
            if not fresh and self._cached is not None and now < self._until:
                return self._cached
        state = _parsed(self.store.get_meta(DEFAULTS_META_KEY))
        with self._lock:
            self._cached, self._until = state, now + self.fresh_seconds
        return state

    def _change(self, change: Callable[[DefaultAdapters], T]) -> tuple[DefaultAdapters, T]:
        """Applies `change` (the stored state -> the new one, or None to leave it; or raises a refusal) over the
        version it read (adapter_meta.update_meta): two /v1/lora/* calls at once both land, neither is lost."""
        def step(current: Optional[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], tuple[DefaultAdapters, T]]:
            state = _parsed(current)
            answer = change(state)
            if not isinstance(answer, DefaultAdapters):
                return None, (state, answer)
            new = answer.model_copy(update={"updated_at": time.time()})
            return new.model_dump(mode="json"), (new, answer)

        state, answer = update_meta(self.store, DEFAULTS_META_KEY, step)
        with self._lock:
            self._cached, self._until = state, time.monotonic() + self.fresh_seconds
        return state, answer

    # -- upstream's operations ------------------------------------------------------------------------

    def entry_for(self, reference: str) -> AdapterEntry:
        """The adapter a /v1/lora/load `lora_path` means: an adapter's name, or a path whose last part names
        one (upstream passes paths: `<dir>/final`, `<dir>/final/adapter_model.safetensors`, `x.safetensors`).
        Only the catalog is consulted: no file outside ACESTEP_LORA_DIR is read."""
        text = reference.strip()
        parts = [p for p in text.replace("\\", "/").split("/") if p]
        while len(parts) > 1 and parts[-1] in TRAINER_PARTS:
            parts.pop()
        base = parts[-1] if parts else text
        names = [text] + [n for n in (base, base.removesuffix(".safetensors"), base.removesuffix(".zip")) if n != text]
        for name in dict.fromkeys(names):
            entry = self.catalog.find(name)
            if entry is not None:
                return entry
        raise AdapterRejected(self.catalog.problem(names[-1]))

    def load(self, reference: str, label: Optional[str] = None) -> tuple[DefaultAdapters, AdapterEntry]:
        """Without `label`: this adapter alone becomes the default. With one: it is added to the stack
        (upstream's multi-adapter add_lora), or replaces the one loaded under that label."""
        entry = self.entry_for(reference)
        model = next(iter(self.catalog.served_models()), "")
        reason = mismatch(entry, model, self.catalog.model_shape(model)) if model else None
        if reason:
            raise AdapterRejected(reason)
        added = DefaultAdapter(name=entry.name, scale=1.0, label=label or None, kind=entry.kind)

        def change(state: DefaultAdapters) -> DefaultAdapters:
            if not label:
                return DefaultAdapters(adapters=[added], use_lora=True)
            kept = [a for a in state.adapters if a.called != label and a.name != entry.name]
            if len(kept) >= MAX_ADAPTERS:
                raise AdapterRejected(f"at most {MAX_ADAPTERS} adapters stacked; unload one first")
            return DefaultAdapters(adapters=[*kept, added], use_lora=True)

        return self._change(change)[0], entry

    def unload(self) -> tuple[DefaultAdapters, bool]:
        """Clear the default; False when none was loaded."""
        state, answer = self._change(lambda state: DefaultAdapters() if state.adapters else False)
        return state, answer is not False

    def toggle(self, use_lora: bool) -> DefaultAdapters:
        def change(state: DefaultAdapters) -> DefaultAdapters:
            if not state.adapters:
                raise AdapterRejected("no adapter loaded: POST /v1/lora/load first")
            return state.model_copy(update={"use_lora": use_lora})

        return self._change(change)[0]

    def scale(self, scale: float, label: Optional[str] = None) -> DefaultAdapters:
        """Every loaded adapter's scale, or with `label` (its adapter_name or name) that one's."""
        def change(state: DefaultAdapters) -> DefaultAdapters:
            if not state.adapters:
                raise AdapterRejected("no adapter loaded: POST /v1/lora/load first")
            if label and not any(label in (a.called, a.name) for a in state.adapters):
                loaded = ", ".join(a.called for a in state.adapters)
                raise AdapterRejected(f"adapter_name {label!r} is not loaded (loaded: {loaded})")
            stack = [a.model_copy(update={"scale": scale}) if not label or label in (a.called, a.name) else a
                     for a in state.adapters]
            return state.model_copy(update={"adapters": stack})

        return self._change(change)[0]

    def uses(self, name: str) -> bool:
        """Whether the default names adapter `name` (read fresh: DELETE /v1/adapters refuses then)."""
        return any(a.name == name for a in self.current(fresh=True).adapters)


def status_payload(state: DefaultAdapters, *, model_initialized: bool) -> dict[str, Any]:
    """GET /v1/lora/status in upstream's shape, plus what the default applies to here."""
    first = state.adapters[0] if state.adapters else None
    return {
        "model_initialized": model_initialized,
        "lora_loaded": bool(state.adapters),
        "use_lora": bool(state.adapters) and state.use_lora,
        "lora_scale": first.scale if first else 1.0,
        "adapter_type": first.kind if first else None,
        "scales": {a.called: a.scale for a in state.adapters},
        "active_adapter": first.called if first else None,
        "adapters": [a.called for a in state.adapters],
        "synthetic_default_mode": False,
        # this server's own: the default is what requests without an `adapter` field get, fleet-wide
        "default_adapters": [{"name": a.name, "adapter_name": a.label, "scale": a.scale, "type": a.kind}
                             for a in state.adapters],
        "applies_to": "requests that name no adapter",
        "updated_at": state.updated_at,
    }


__all__ = ["DEFAULTS_META_KEY", "DefaultAdapter", "DefaultAdapterState", "DefaultAdapters", "status_payload"]
