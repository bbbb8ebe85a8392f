"""The worker's second stage: a generated batch's audio is encoded, stored and recorded here, in a
thread of its own with encoding in processes (engine/encoder_pool.py), while the engine already
runs the next batch.

Batches are recorded in the order they were handed over, each task acked only after its result is
recorded (by the worker's OutcomeRecorder, service/worker_outcomes.py: the same path as unpipelined). At most `depth` batches are in this stage at once: a hand-off
waits for room, so memory stays flat whatever the queue holds. Meanwhile their leases, and any
lease the worker holds for its next round, are kept alive (LeaseKeeper). A task whose encoding
fails fails alone; on shutdown the stage drains (a first signal), or hands back what is not
encoded yet (cancel: a second signal).
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from engine.types import EncodedAudio, GenerationCancelled, GenerationError, GenerationResult

from .lease_keeper import LeaseKeeper
from .ports import AudioEncoder, Lease
from .storage_errors import StorageFull
from .worker_outcomes import HeldTask, Outcome, OutcomeRecorder

log = logging.getLogger(__name__)

_WAIT_SLICE_SECONDS = 0.2  # how often a wait for encoders looks at the cancel event
_ROOM_CHECK_SECONDS = 1.0  # how often a hand-over waiting for room checks that the stage still runs


@dataclass
class _Entry:
    batch: Sequence[HeldTask]
    outcomes: list[Outcome]
    encodes: list[list["Future[tuple[EncodedAudio, float]]"]]  # per task, per audio file


class PostStage:
    def __init__(self, recorder: OutcomeRecorder, encoder: Optional[AudioEncoder],
                 keeper: LeaseKeeper, depth: int, cancel_event: threading.Event, encode_timeout: float):
        self.recorder = recorder  # the worker's: store, finish, ack (raises StorageFull at the end)
        self.encoder, self.keeper, self.cancel_event = encoder, keeper, cancel_event
        # A batch's encoding that takes longer than this is stuck (a hung encoder process): its tasks
        # fail with that reason and the encoders are restarted, rather than holding the stage forever.
        self.encode_timeout = encode_timeout
        self._room = threading.Semaphore(depth)
        self._queue: "queue.Queue[Optional[_Entry]]" = queue.Queue()
        self._in_stage: list[str] = []  # task ids handed over and not recorded yet
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[StorageFull] = None

    # -- the worker's side --------------------------------------------------------------------

    def hand_over(self, batch: Sequence[HeldTask], outcomes: list[Outcome], hold: Sequence[Lease] = ()) -> None:
        """Queue a generated batch; blocks while `depth` batches are in the stage (keeping the batch's
        leases and `hold` alive meanwhile). Encoding starts at once, in the encoder processes."""
        for c in batch:
            self.keeper.add(c.lease, c.attempt)
        for lease in hold:
            self.keeper.add(lease, None)
        try:
            outcomes, encodes = self._start_encoding(outcomes)
            with self._lock:
                self._in_stage += [c.lease.task_id for c in batch]
            self._wait_for_room()
        finally:
            for lease in hold:
                self.keeper.remove(lease)
        self._start()
        self._queue.put(_Entry(batch, outcomes, encodes))

    def _start_encoding(self, outcomes: list[Outcome]) -> tuple[list[Outcome], list[Any]]:
        """Each outcome's encodes, started; an outcome whose encoding cannot start becomes its error
        (the stage then records it as failed, so its task does not stay running)."""
        started: list[Outcome] = []
        encodes: list[Any] = []
        for outcome in outcomes:
            futures: list[Any] = []
            if isinstance(outcome, GenerationResult) and outcome.pending:
                try:
                    if self.encoder is None:  # the worker asks for encoded audio when it has no encoder
                        raise RuntimeError("no encoder to encode it")
                    futures = [self.encoder.submit(p) for p in outcome.pending]
                except Exception as exc:
                    for future in futures:
                        future.cancel()
                    outcome, futures = GenerationError(f"could not start encoding the audio: {exc}"), []
            started.append(outcome)
            encodes.append(futures)
        return started, encodes

    def _wait_for_room(self) -> None:
        while not self._room.acquire(timeout=_ROOM_CHECK_SECONDS):
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the post-processing stage has stopped")

    def wait_idle(self) -> None:
        """Until every batch handed over is recorded."""
        self._queue.join()

    def idle(self) -> bool:
        with self._lock:
            return not self._in_stage

    def task_ids(self) -> list[str]:
        with self._lock:
            return list(self._in_stage)

    def take_error(self) -> Optional[StorageFull]:
        """The storage outage a recording met (its task was handed back), once."""
        with self._lock:
            error, self._error = self._error, None
        return error

    def close(self) -> None:
        """Drain (or, once cancel_event is set, hand back) what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # -- the stage's thread --------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                            name="post-processing", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is None:
                    return
                self._process(entry)
            finally:
                if entry is not None:
                    self._room.release()
                self._queue.task_done()

    def _process(self, entry: _Entry) -> None:
        try:
            outcomes = [self._encoded_or_error(o, fs) for o, fs in zip(entry.outcomes, entry.encodes)]
            # the worker removes each lease from the keeper just before it acks or releases it
            self.recorder.record(entry.batch, outcomes)
        except StorageFull as exc:
            with self._lock:
                self._error = exc
        except Exception:  # a store hiccup: the leases lapse and the tasks are redelivered
            log.exception("could not record a batch; its tasks will be redelivered")
        finally:
            for c in entry.batch:  # those left alone (lost to a newer attempt) lapse on their own
                self.keeper.remove(c.lease)
            with self._lock:
                for c in entry.batch:
                    self._in_stage.remove(c.lease.task_id)

    def _encoded_or_error(self, outcome: Outcome, futures: list[Any]) -> Outcome:
        try:
            return self._encoded(outcome, futures)
        except BaseException as exc:  # noqa: BLE001 - the stage thread must outlive any one task
            log.exception("encoding a task's audio failed unexpectedly")
            return GenerationError(f"could not encode the audio: {type(exc).__name__}")

    def _encoded(self, outcome: Outcome, futures: list["Future[tuple[EncodedAudio, float]]"]) -> Outcome:
        """The outcome with its audio encoded; the encoder's error if that failed; GenerationCancelled when
        the worker abandons its tasks (second signal) before the encoding is done; a GenerationError
        when the encoding takes longer than encode_timeout."""
        if not isinstance(outcome, GenerationResult) or not outcome.pending:
            return outcome
        deadline = time.monotonic() + self.encode_timeout
        while True:
            _, waiting = concurrent.futures.wait(futures, timeout=_WAIT_SLICE_SECONDS)
            if not waiting:  # done, even if a second signal came meanwhile: record it
                break
            if self.cancel_event.is_set():
                for f in futures:
                    f.cancel()
                return GenerationCancelled("worker is shutting down")
            if time.monotonic() > deadline:
                for f in futures:
                    f.cancel()
                assert self.encoder is not None
                self.encoder.reset()
                return GenerationError(f"encoding the audio did not finish within {self.encode_timeout:g} s")
        files: list[tuple[EncodedAudio, float]] = []
        for pending, future in zip(outcome.pending, futures):
            try:
                files.append(future.result())
            except BrokenProcessPool:  # another item's encoder died: this item gets a fresh one
                try:
                    assert self.encoder is not None
                    files.append(self.encoder.retry(pending, timeout=max(1.0, deadline - time.monotonic())))
                except Exception as exc:
                    return GenerationError(f"could not encode the audio: the encoder process died ({exc})")
            except Exception as exc:  # this task's audio only (e.g. non-finite samples)
                return exc
        outcome.audios, outcome.pending = [f for f, _ in files], []
        timings = outcome.generation_info.get("timings")
        if isinstance(timings, dict):  # files encode in parallel: the longest is the stage's time
            timings["audio_encoding_s"] = round(max(s for _, s in files), 4)
        return outcome
