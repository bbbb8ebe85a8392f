"""The worker loop: lease a task, run the engine, store the audio, record the outcome.

It talks only to the ports and to an engine object with the `engine.service.Engine` interface
(`models()`, `describe()`, `generate()`, `generate_many()`), so the same loop runs on SQLite or
SQS/DynamoDB and with the real engine or a test one.

Delivery is at least once: a lease that is not acked (the worker died) comes back after its
visibility timeout. `store.claim` bumps the task's attempt number and `store.finish` only
accepts the current attempt, so a task finishes exactly once.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from engine import plan
from engine.request import MAX_BATCH, GenerationRequest
from engine.types import GenerationCancelled, GenerationError, GenerationResult

from .config import Settings
from .blob_keys import output_key
from .ports import Backend, Lease
from .records import MODELS_META_KEY, AudioFile, ModelEntry, ModelsMeta, TaskResult

log = logging.getLogger("acestep.worker")

# Progress writes are throttled: a store write per diffusion step would dominate small tasks.
PROGRESS_MIN_DELTA = 0.05
PROGRESS_MIN_SECONDS = 0.5
SWEEP_INTERVAL_SECONDS = 600
DEAD_LETTER_INTERVAL_SECONDS = 30


class _Chore:
    """A backend housekeeping call (returns a count), run at most once per interval.

    A failure is logged and retried next interval: housekeeping must not stop the worker.
    """

    def __init__(self, fn: Optional[Callable[[], int]], interval: float, done_message: str,
                 level: int = logging.INFO):
        self.fn, self.interval, self.done_message, self.level = fn, interval, done_message, level
        self.last_run: Optional[float] = None  # None: due now

    def run_if_due(self) -> None:
        now = time.monotonic()
        if self.fn is None or (self.last_run is not None and now - self.last_run < self.interval):
            return
        self.last_run = now
        try:
            n = self.fn()
            if n:
                log.log(self.level, self.done_message, n)
        except Exception:
            log.exception("housekeeping failed: %s", self.done_message)


@dataclass
class _Claimed:
    lease: Lease
    attempt: int
    request: GenerationRequest
    inputs: dict  # src_audio / reference_audio bytes


def batch_key(request: dict, default_model: Optional[str]) -> Optional[tuple]:
    """The engine's own rule for which tasks can share one pipeline call (None: run alone)."""
    try:
        req = GenerationRequest(**request)
    except ValueError:
        return None
    return plan.batch_key(req, req.model or default_model or "")


class _ProgressReporter:
    """Throttled progress writes for the tasks of one engine call; also the cancellation point."""

    def __init__(self, worker: "Worker", claimed: list[_Claimed]):
        self.worker, self.claimed = worker, claimed
        self.last_value, self.last_stage, self.last_time = -1.0, "", 0.0

    def __call__(self, fraction: float, stage: str) -> None:
        if self.worker.cancel_event.is_set():
            raise GenerationCancelled("worker is shutting down")
        now = time.monotonic()
        if stage == self.last_stage and fraction - self.last_value < PROGRESS_MIN_DELTA \
                and now - self.last_time < PROGRESS_MIN_SECONDS:
            return
        self.last_value, self.last_stage, self.last_time = fraction, stage, now
        for c in self.claimed:
            self.worker.backend.store.update_progress(c.lease.task_id, c.attempt, round(fraction, 3), stage)


class _LeaseKeeper:
    """Extends the leases of running tasks so long generations are not redelivered."""

    def __init__(self, worker: "Worker", leases: list[Lease]):
        self.worker, self.leases = worker, leases
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        timeout = self.worker.settings.visibility_timeout
        while not self._stop.wait(timeout / 3):
            for lease in self.leases:
                try:
                    self.worker.backend.queue.extend(lease, timeout)
                except Exception:  # a missed extension only risks a redelivery, which is fenced
                    log.exception("could not extend lease of %s", lease.task_id)


class Worker:
    def __init__(self, settings: Settings, backend: Backend, engine: Any,
                 worker_id: Optional[str] = None, lm_available: bool = False):
        self.settings = settings
        self.backend = backend
        self.engine = engine
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lm_available = lm_available
        self.stop_event = threading.Event()  # stop taking new work
        self.cancel_event = threading.Event()  # abandon the running task too (release its lease)
        # Backend housekeeping, each due on the first round and then every interval.
        self.dead_letter_chore = _Chore(backend.drain_dead_letters, DEAD_LETTER_INTERVAL_SECONDS,
                                        "marked %d dead-lettered task(s) failed", logging.WARNING)
        self.sweep_chore = _Chore(backend.sweep_expired, SWEEP_INTERVAL_SECONDS,
                                  "removed %d expired task(s)/upload(s)")
        # A lease taken while filling a batch that did not fit it: run first next round rather
        # than hand it back (a give-back would count as a failed delivery on SQS).
        self._carried: Optional[Lease] = None

    # -- lifecycle -------------------------------------------------------------------------

    def publish_models(self) -> None:
        """Tell the API what this worker serves (for /v1/models and /health)."""
        info = self.engine.describe() if hasattr(self.engine, "describe") else {}
        meta = ModelsMeta(
            models=[ModelEntry(name=m.name, is_default=m.is_default, random_weights=m.random_weights,
                               task_types=list(m.task_types)) for m in self.engine.models()],
            device=info.get("device"), dtype=info.get("dtype"), lm_model=info.get("lm_model", "none"),
            worker_id=self.worker_id, updated_at=time.time())
        self.backend.store.put_meta(MODELS_META_KEY, meta.model_dump())

    def run_forever(self, poll_seconds: float = 5.0) -> None:
        self.publish_models()
        log.info("worker %s ready", self.worker_id)
        while not self.stop_event.is_set():
            try:
                self.run_once(poll_seconds)
            except Exception:  # the loop must survive a backend hiccup
                log.exception("worker loop error")
                self.stop_event.wait(1.0)
        if self._carried is not None:
            self.backend.queue.release(self._carried)
            self._carried = None
        log.info("worker %s stopped", self.worker_id)

    def request_stop(self, cancel_running: bool = False) -> None:
        self.stop_event.set()
        if cancel_running:
            self.cancel_event.set()

    # -- one round -------------------------------------------------------------------------

    def run_once(self, wait_seconds: float) -> bool:
        """Process the next task (and compatible ones waiting behind it). False if none came."""
        self.dead_letter_chore.run_if_due()
        self.sweep_chore.run_if_due()
        lease, self._carried = self._carried, None
        if lease is not None:
            self.backend.queue.extend(lease, self.settings.visibility_timeout)
        else:
            lease = self.backend.queue.receive(wait_seconds, self.settings.visibility_timeout)
        if lease is None:
            return False
        if self.stop_event.is_set():  # arrived during a long poll after shutdown began
            self.backend.queue.release(lease)
            return False
        leases = [lease]
        if self.settings.batch_compatible_tasks and hasattr(self.engine, "generate_many"):
            leases += self._receive_more(lease)
        claimed = [c for c in (self._claim(l) for l in leases) if c is not None]
        if claimed:
            self._run(claimed)
        return True

    def _receive_more(self, first: Lease) -> list[Lease]:
        """Grab waiting tasks that can share one pipeline call with `first` (never waits).

        The first task that cannot join is carried over to the next round.
        """
        default_model = self.settings.default_model
        first_record = self.backend.store.get(first.task_id)
        key = batch_key(first_record.request, default_model) if first_record else None
        if key is None:
            return []
        items = int(first_record.request.get("batch_size", 1))
        more: list[Lease] = []
        while items < MAX_BATCH and not self.stop_event.is_set():
            lease = self.backend.queue.receive(0, self.settings.visibility_timeout)
            if lease is None:
                break
            record = self.backend.store.get(lease.task_id)
            size = int(record.request.get("batch_size", 1)) if record else 0
            if record is None or batch_key(record.request, default_model) != key or items + size > MAX_BATCH:
                self._carried = lease
                break
            more.append(lease)
            items += size
        return more

    def _claim(self, lease: Lease) -> Optional[_Claimed]:
        store, task_id = self.backend.store, lease.task_id
        attempt = store.claim(task_id, self.worker_id)
        if attempt is None:  # finished already (duplicate delivery) or unknown
            self.backend.queue.ack(lease)
            return None
        record = store.get(task_id)
        try:
            request = GenerationRequest(**record.request)
            if request.needs_lm and not self.lm_available:
                raise GenerationError(
                    "this request needs the 5Hz LM (sample_mode / sample_query / use_format / "
                    "analysis), which is not loaded on this server")
            inputs = {}
            for role in ("src_audio", "reference_audio"):
                key = getattr(request, f"{role}_key")
                if key:
                    inputs[role] = self._read_input(role, key)
        except (GenerationError, ValueError) as exc:
            self._fail(lease, attempt, str(exc))
            return None
        return _Claimed(lease, attempt, request, inputs)

    def _read_input(self, role: str, key: str) -> bytes:
        # Checked again here: a presigned upload URL can replace the file after submission.
        limit = self.settings.max_upload_mb * 1024 * 1024
        size = self.backend.blobs.size(key)
        if size is not None and size > limit:
            raise GenerationError(f"{role} upload is {size / 2**20:.1f} MB; the limit is {self.settings.max_upload_mb} MB")
        try:
            return self.backend.blobs.get(key)
        except KeyError:
            raise GenerationError(f"{role} upload {key!r} is missing from storage") from None

    def _run(self, claimed: list[_Claimed]) -> None:
        started = time.monotonic()
        reporter = _ProgressReporter(self, claimed)
        with _LeaseKeeper(self, [c.lease for c in claimed]):
            try:
                if len(claimed) == 1:
                    c = claimed[0]
                    outcomes: list = [self._generate_one(c, reporter)]
                else:
                    outcomes = self.engine.generate_many(
                        [(c.request, c.inputs) for c in claimed], progress=reporter)
            except GenerationCancelled:
                for c in claimed:
                    log.info("released %s for another worker (shutting down)", c.lease.task_id)
                    self.backend.queue.release(c.lease)
                return
            except Exception as exc:  # an engine crash fails these tasks, with the reason
                log.exception("engine failed")
                outcomes = [exc] * len(claimed)
        for c, outcome in zip(claimed, outcomes):
            if isinstance(outcome, GenerationCancelled):
                self.backend.queue.release(c.lease)
            elif isinstance(outcome, BaseException):
                self._fail(c.lease, c.attempt, _describe_error(outcome))
            else:
                self._succeed(c, outcome)
        log.info("ran %d task(s) in %.2fs", len(claimed), time.monotonic() - started)

    def _generate_one(self, c: _Claimed, reporter: _ProgressReporter):
        try:
            return self.engine.generate(c.request, src_audio=c.inputs.get("src_audio"),
                                        reference_audio=c.inputs.get("reference_audio"), progress=reporter)
        except GenerationCancelled:
            raise
        except Exception as exc:
            return exc

    # -- outcomes --------------------------------------------------------------------------

    def _succeed(self, c: _Claimed, result: GenerationResult) -> None:
        task_id = c.lease.task_id
        keys, audios = [], []
        for i, audio in enumerate(result.audios):
            key = output_key(task_id, c.attempt, i, audio.format)
            self.backend.blobs.put(key, audio.data, audio.content_type)
            keys.append(key)
            audios.append(AudioFile(key=key, format=audio.format, seed=audio.seed,
                                    duration=round(audio.duration_seconds, 3),
                                    sample_rate=audio.sample_rate, channels=audio.channels))
        info = dict(result.generation_info)
        if c.request.thinking and not self.lm_available:
            info.setdefault("notes", []).append(
                "thinking was requested but no 5Hz LM is loaded: the DiT ran without LM planning")
        stored = TaskResult(audios=audios, metas=result.metas, generation_info=info,
                            dit_model=result.dit_model, lm_model=result.lm_model)
        if self.backend.store.finish(task_id, c.attempt, result=stored, blob_keys=keys):
            log.info("task %s succeeded (%d file(s))", task_id, len(keys))
        else:  # another attempt finished it first; drop our copy
            for key in keys:
                self.backend.blobs.delete(key)
            log.warning("task %s was finished by another attempt; discarded attempt %d", task_id, c.attempt)
        self.backend.queue.ack(c.lease)

    def _fail(self, lease: Lease, attempt: int, message: str) -> None:
        log.warning("task %s failed: %s", lease.task_id, message)
        self.backend.store.finish(lease.task_id, attempt, error=message)
        self.backend.queue.ack(lease)



def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, GenerationError):
        return str(exc)
    # An unexpected crash: say what kind, without a traceback (that goes to the worker log).
    return f"internal error while generating: {type(exc).__name__}: {exc}"
