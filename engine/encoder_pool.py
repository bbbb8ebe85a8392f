"""Processes that encode generated audio (mp3/wav/flac), so encoding runs on other cores than the
engine's and never holds the worker's interpreter. The worker's pipeline uses it through its port
(service.ports.AudioEncoder); entrypoints/bootstrap.py creates it.

Started with `spawn`: the worker holds CUDA and many threads, which a forked child must not inherit.
The children import only engine.audio_encode (numpy + soundfile, no torch).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from engine.audio_encode import encode_pending
from engine.types import EncodedAudio, PendingAudio

log = logging.getLogger(__name__)


def default_processes(cpus: int | None = None) -> int:
    """All cores but one (the engine's), at least one."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - 1)


class EncoderPool:
    def __init__(self, processes: int = 0):
        self.processes = processes if processes > 0 else default_processes()
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def submit(self, pending: PendingAudio) -> "Future[tuple[EncodedAudio, float]]":
        """Encode in a pool process: the future gives (encoded file, seconds it took)."""
        pool = self._executor()
        try:
            return pool.submit(encode_pending, pending)
        except BrokenProcessPool:  # an encoder process died (e.g. killed): start a new pool once
            self._replace(pool)
            return self._executor().submit(encode_pending, pending)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                log.warning("an audio encoder process died: starting new ones")
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def retry(self, pending: PendingAudio) -> tuple[EncodedAudio, float]:
        """Encode once more and wait: for an item whose future failed with BrokenProcessPool because
        another item's encoder died (submit then starts a fresh pool)."""
        return self.submit(pending).result()

    def warm_up(self) -> None:
        """Start the processes now rather than on the first song (spawn takes a second or so each)."""
        pool = self._executor()
        for _ in range(self.processes):
            pool.submit(os.getpid)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
