"""The model set one machine's workers should serve, as POST /v1/init asked for it (upstream's run-time model
switch).

Upstream's server holds its models in its own process and /v1/init reloads them there. Here the workers are other
processes, so the wish is a small record in the task store (meta MODEL_SET_META_KEY) that each worker reads between
batches and loads (service/model_switch.py); what a worker actually serves is in its heartbeat. The record says
which start-up settings it amends (`base`): a service restarted with other ACESTEP_CONFIG_PATH / LM settings
ignores a wish made under the old ones, so the settings a user restarts with always win.

Two /v1/init calls at once both land in order: each is a conditional write over the version it read
(adapter_meta.update_meta), and `version` counts the wishes, so a worker knows which one it answered.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import BaseModel, Field, ValidationError

from .adapter_meta import update_meta
from .config import Settings
from .ports import TaskStore

MODEL_SET_META_KEY = "models_wanted"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a folder under the checkpoint dir, nothing more


class ModelSet(BaseModel):
    """DiT models (the first is the default), whether the 5 Hz LM runs, which one, and on which backend."""
    models: list[str] = Field(min_length=1, max_length=3)
    lm: bool = False
    lm_model: Optional[str] = None  # None: the start-up one (ACESTEP_LM_MODEL_PATH, else the default LM)
    lm_backend: Optional[str] = None  # None: the start-up setting (ACESTEP_LM_BACKEND)

    def key(self) -> tuple[Any, ...]:
        return tuple(self.models), self.lm, self.lm_model or None, self.lm_backend or None

    def describe(self) -> str:
        lm = f" with the LM {self.lm_model or '(default)'}" if self.lm else " without the LM"
        return " + ".join(self.models) + lm


class WantedModels(ModelSet):
    """The record: the set asked for, the start-up set it amends, and which wish this is."""
    base: list[str] = []  # start_key(settings) of the service it was asked of
    version: int = 0
    requested_at: Optional[float] = None


def start_key(settings: Settings) -> list[str]:
    """The start-up settings a wish amends: the DiT names, then the LM settings."""
    return [*settings.model_names, f"lm={settings.init_llm}:{settings.lm_model_path}:{settings.lm_backend}"]


def read_wanted(store: TaskStore, settings: Settings) -> Optional[WantedModels]:
    """The wish that applies to this service's settings, or None (none made, or made under other settings)."""
    return _applying(store.get_meta(MODEL_SET_META_KEY), settings)


def _applying(stored: Optional[dict[str, Any]], settings: Settings) -> Optional[WantedModels]:
    try:
        wanted = WantedModels.model_validate(stored) if stored else None
    except ValidationError:
        return None  # a record no version of this code wrote
    return wanted if wanted is not None and wanted.base == start_key(settings) else None


def ask_for(store: TaskStore, settings: Settings, wanted: ModelSet, retry: bool = False) -> WantedModels:
    """Record `wanted` as the set to serve; the record as it stands after (the same one when it was wished
    already: asking again does not make the workers reload). `retry`: a new version even then, so each worker
    that failed to load it tries once more."""
    def change(current: Optional[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], WantedModels]:
        now = _applying(current, settings)
        if now is not None and now.key() == wanted.key() and not retry:
            return None, now
        version = max(now.version if now else 0, int((current or {}).get("version") or 0)) + 1
        record = WantedModels(**wanted.model_dump(), base=start_key(settings), version=version,
                              requested_at=time.time())
        return record.model_dump(mode="json"), record

    return update_meta(store, MODEL_SET_META_KEY, change)


__all__ = ["MODEL_NAME_PATTERN", "MODEL_SET_META_KEY", "ModelSet", "WantedModels", "ask_for", "read_wanted",
           "start_key"]
