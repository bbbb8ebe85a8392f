"""Starting without real weights: serve random-weight demos meanwhile, and keep trying for the real ones.

`plan_start(config)` decides, for each configured DiT:

    real weights in <checkpoint_dir>/<name>     served
    a demo from an earlier start (.demo/<name>) the demo is served at once; when downloads are possible the real
                                                download is retried in the background (`BackgroundDownloads`)
    nothing, downloads possible                 Engine.load downloads it now (the first start waits for it); when
                                                that fails the caller falls back to a demo (`ensure_demo_models`)
    nothing, downloads impossible               a demo is built in .demo/<name> and served

A background download writes the real model's folder (never the demo's), converts an original-layout model, and
is used from the next start: a running engine keeps the models it loaded. One try per start and model, bounded
by the hub client's own connect/read timeouts; a model another process is already downloading is left to it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.weights import model_sources
from engine.weights.checkpoints import (
    DEMO_DIR,
    demo_model_dir,
    download_model,
    ensure_demo_models,
    is_complete,
    is_random,
    local_layout,
    model_dir,
    move_demo_aside,
)
from engine.config import EngineConfig

log = logging.getLogger("engine.weights.demo_models")
STARTED: list["BackgroundDownloads"] = []  # this process's background downloads (tests wait on them)


@dataclass
class StartPlan:
    demo: list[str] = field(default_factory=list)  # DiTs served with random weights
    retry: list[str] = field(default_factory=list)  # of those, the ones whose real download runs in the background


def plan_start(config: EngineConfig) -> StartPlan:
    """Choose demo stand-ins for the DiTs without real weights (see the module's table); adds them to
    config.demo_models and builds the ones that are missing."""
    plan = StartPlan()
    can_download = config.downloads_possible()
    stand_ins = []
    for name in config.model_names:
        if can_download:
            move_demo_aside(config.checkpoint_dir, name)  # a demo in the real folder must not block the download
        if local_layout(config.checkpoint_dir, name) is not None:
            if is_random(model_dir(config.checkpoint_dir, name)):
                plan.demo.append(name)  # offline, a demo built in place (make-tiny): served as it is, labelled
            continue
        if can_download and not is_complete(demo_model_dir(config.checkpoint_dir, name)):
            continue  # first start: Engine.load downloads it and waits
        stand_ins.append(name)
        if can_download:
            plan.retry.append(name)
    plan.demo += ensure_demo_models(config, stand_ins)
    return plan


class BackgroundDownloads:
    """Fetch real weights for models served as demos, one after another, off the caller's thread.

    `dits` are DiT names (downloaded and, in the original layout, converted); `lms` are 5 Hz LM names.
    `results` maps each name to "ready", "busy" (another process is downloading it) or the one-line reason it
    failed. The next start serves what became ready.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, dits: list[str], lms: Optional[list[str]] = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.dits, self.lms = list(dits), list(lms or [])
        self.results: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, daemon=True, name="real-weights-download")

    def start(self) -> "BackgroundDownloads":
        if self.dits or self.lms:
            log.warning("serving random-weight demo(s) for %s meanwhile; trying to download the real weights in the "
                        "background (used from the next start)", ", ".join(self.dits + self.lms))
            self.thread.start()
            STARTED.append(self)
        return self

    def join(self, timeout: Optional[float] = None) -> dict[str, str]:
        if self.thread.is_alive() or self.thread.ident is not None:
            self.thread.join(timeout)
        return self.results

    def _run(self) -> None:
        for name, is_lm in [(n, False) for n in self.dits] + [(n, True) for n in self.lms]:
            try:
                self.results[name] = self._fetch(name, is_lm)
            except model_sources.DownloadFailed as exc:
                self.results[name] = str(exc)
                log.warning("still serving the random-weight demo of %s: %s", name, exc)
            except Exception as exc:  # a background thread must not die silently; the demo goes on
                self.results[name] = f"{type(exc).__name__}: {exc}"
                log.warning("still serving the random-weight demo of %s: the background download failed (%s: %s)",
                            name, type(exc).__name__, exc)

    def _fetch(self, name: str, is_lm: bool) -> str:
        lock_path = self.checkpoint_dir / DEMO_DIR / f".{name}.download.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another process is downloading %s; leaving it to that one", name)
                return "busy"
            try:
                if is_lm:
                    folder = model_sources.download(model_sources.source_for(name), self.checkpoint_dir)
                else:
                    folder = download_model(name, self.checkpoint_dir)
                    if local_layout(self.checkpoint_dir, name) == "original":
                        from engine.weights.converted_cache import ensure_converted

                        ensure_converted(self.checkpoint_dir, name)  # so the next start loads at once
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        log.warning("the real weights of %s are ready in %s; restart the service to use them instead of the "
                    "random-weight demo", name, folder)
        return "ready"
