"""A worker's side of POST /v1/init: between batches, see the model set the service was asked to serve
(service/model_set.py), load it, swap it in, and say so in the heartbeat.

The new engine is loaded while the old one still serves (its fit check, engine/memory.py, counts the memory the
old one holds), so a set that does not fit, or fails to load, leaves the old one in place. Only when the new set
fits the machine but not beside the old one is the old one dropped first; if the new one then fails to load,
the old set is loaded again (and if even that fails the worker stops: its supervisor starts it afresh from its
start-up settings).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from engine.request import GenerationRequest
from engine.types import DeviceReport, EngineInfo, GenerationError, GenerationResult, ModelInfo, ProgressCallback

from .config import Settings
from .model_set import WantedModels, read_wanted
from .ports import GenerationEngine, TaskStore

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0  # a worker reads the wish at most this often (one meta read)


@dataclass
class Switched:
    engine: Optional[GenerationEngine]  # the engine to use from now on; None: keep the one in use
    settings: Settings  # the settings that engine was loaded with
    error: Optional[str] = None  # why the wished set is not what serves


class Unloaded:
    """Stands in for the engine while a switch that had to drop the old one first loads the new one."""
    lm_loaded = False

    def models(self) -> list[ModelInfo]:
        return []

    def describe(self) -> EngineInfo:
        return {}

    def devices(self) -> Optional[DeviceReport]:
        return None  # nothing loaded

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None, progress: Optional[ProgressCallback] = None,
                 encode: bool = True) -> GenerationResult:
        raise GenerationError("the worker is switching models")

    def generate_batch(self, items: list[tuple[GenerationRequest, dict[str, bytes]]],
                       progress: Optional[ProgressCallback] = None,
                       encode: bool = True) -> list[GenerationResult | BaseException]:
        raise GenerationError("the worker is switching models")


class ModelSwitch:
    """`load`: settings -> a loaded engine (entrypoints/bootstrap.load_engine). `does_not_fit`: what `load` raises
    when the memory fit check refused the set (engine.memory.DoesNotFit): beside the old engine it is retried
    after dropping the old one; any other exception is a failed load."""

    def __init__(self, settings: Settings, store: TaskStore, load: Callable[[Settings], GenerationEngine],
                 does_not_fit: tuple[type[BaseException], ...] = (),
                 check_seconds: float = CHECK_SECONDS):
        self.start_settings = self.settings = settings
        self.store, self.load, self.does_not_fit = store, load, does_not_fit
        self.check_seconds = check_seconds
        self.answered = 0  # the version of the last wish this worker acted on
        self.error: Optional[str] = None  # why that wish is not what it serves
        self.loading: Optional[str] = None  # the set being loaded now, in words (for the heartbeat)
        self._next_check = 0.0

    def due(self, engine: GenerationEngine) -> Optional[WantedModels]:
        """A wish this worker has not acted on yet, or None (read at most every check_seconds)."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self.check_seconds
        wanted = read_wanted(self.store, self.start_settings)
        if wanted is None or wanted.version <= self.answered:
            return None
        if _key(self.settings_for(wanted), True) == _key(self.settings, engine.lm_loaded):
            self.answered, self.error = wanted.version, None  # serves it already: nothing to load
            return None
        return wanted

    def settings_for(self, wanted: WantedModels) -> Settings:
        paths = [*wanted.models, "", "", ""]
        update: dict[str, Any] = {"config_path": paths[0], "config_path2": paths[1], "config_path3": paths[2],
                                  "init_llm": "true" if wanted.lm else "false",
                                  "lm_model_path": wanted.lm_model or self.start_settings.lm_model_path}
        if wanted.lm_backend:
            update["lm_backend"] = wanted.lm_backend
        return self.start_settings.model_copy(update=update)

    def load_at_start(self) -> tuple[GenerationEngine, Settings]:
        """The engine a starting worker serves with, and its settings: the set POST /v1/init asked for when the
        store holds a wish that applies to these start-up settings (loaded directly: one load, not the start-up
        set and then a switch), else, or when that fails to load, the start-up set."""
        wanted = read_wanted(self.store, self.start_settings)
        if wanted is None:
            return self.load(self.start_settings), self.start_settings
        target = self.settings_for(wanted)
        if _key(target, True) != _key(self.start_settings, True):
            log.info("loading the model set asked for by POST /v1/init (#%d): %s", wanted.version, wanted.describe())
            try:
                engine = self.load(target)
            except Exception as exc:
                self._failed(wanted, exc, None)
            else:
                self.settings, self.answered, self.error = target, wanted.version, None
                return engine, target
        else:
            self.answered = wanted.version
        return self.load(self.start_settings), self.start_settings

    def switch(self, wanted: WantedModels, drop_old: Callable[[], None]) -> Switched:
        """Load `wanted`; `drop_old` releases the engine in use (called only when the new set fits alone)."""
        target = self.settings_for(wanted)
        self.loading = wanted.describe()
        started = time.monotonic()
        log.info("loading the model set asked for by POST /v1/init (#%d): %s", wanted.version, self.loading)
        try:
            try:
                engine = self.load(target)
            except self.does_not_fit as exc:
                log.warning("%s does not fit beside the models in use (%s): unloading them first", self.loading, exc)
                drop_old()
                try:
                    engine = self.load(target)
                except Exception as exc2:
                    return self._failed(wanted, exc2, self.load(self.settings))  # the old set again
            except Exception as exc:
                return self._failed(wanted, exc, None)
        finally:
            self.loading = None
        log.info("now serving %s (loaded in %.1f s)", wanted.describe(), time.monotonic() - started)
        self.settings, self.answered, self.error = target, wanted.version, None
        return Switched(engine, target)

    def _failed(self, wanted: WantedModels, exc: BaseException, reloaded: Optional[GenerationEngine]) -> Switched:
        self.answered = wanted.version
        self.error = f"{wanted.describe()} failed to load: {type(exc).__name__}: {exc}"
        log.error("%s; still serving %s", self.error, " + ".join(self.settings.model_names))
        return Switched(reloaded, self.settings, self.error)


def _key(settings: Settings, lm: bool) -> tuple[Any, ...]:
    return tuple(settings.model_names), lm and settings.lm_model_path, settings.lm_backend


__all__ = ["CHECK_SECONDS", "ModelSwitch", "Switched", "Unloaded"]
