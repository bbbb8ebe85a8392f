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
import signal
import threading
import time
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


PARENT_CHECK_SECONDS = 0.5


def _start_encoder(parent_pid: int) -> None:
    """In each encoder process: a terminal's Ctrl+C reaches the whole process group, and the worker
    decides what a signal means (drain, then abort); an encoder must not die of it mid-song. It does
    end with the worker: a worker killed with -9 runs no cleanup, and its encoders (and the resource
    tracker their open pipe keeps alive) would run on forever, so a thread here watches the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    # A thread, not PR_SET_PDEATHSIG: that fires when the *thread* that spawned the child ends, and a
    # replacement pool is spawned from whichever thread submits next.
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)  # reparented: the worker is gone


class EncoderPool:
    def __init__(self, processes: int = 0):
        self.processes = processes if processes > 0 else default_processes()
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_encoder, initargs=(os.getpid(),))
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

    def retry(self, pending: PendingAudio, timeout: float | None = None) -> tuple[EncodedAudio, float]:
        """Encode once more and wait (at most `timeout` s): for an item whose future failed with
        BrokenProcessPool because another item's encoder died (submit then starts a fresh pool)."""
        return self.submit(pending).result(timeout)

    def reset(self) -> None:
        """Stop every encoder process now, hung ones included; the next submit starts new ones."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        log.warning("stopping the audio encoder processes (an encode did not finish in time)")
        # The executor has no public way to stop a busy process before Python 3.14's terminate_workers().
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

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
