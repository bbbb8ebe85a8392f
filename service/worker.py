"""The worker loop: lease a task, run the engine, store the audio, record the outcome.

It talks only to the ports and to a GenerationEngine (service/ports.py), so the same loop runs on
SQLite or SQS/DynamoDB and with the real engine or a test one.

Delivery is at least once: a lease that is not acked (the worker died) comes back after its
visibility timeout. `store.claim` bumps the task's attempt number and `store.finish` only
accepts the current attempt, so a task finishes exactly once. The same attempt fences the queue:
a worker whose attempt is no longer the task's current one never acks, extends or gives back its
lease (on SQS an old receipt can still delete the message the new holder owns).
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from engine import plan
from engine.request import MAX_BATCH, GenerationRequest
from engine.types import GenerationCancelled, GenerationError, GenerationResult

from . import adapter_fetch
from .blob_keys import output_key
from .config import Settings
from .lease_keeper import LeaseKeeper
from .observability.health import HEARTBEAT_SECONDS
from .observability.heartbeat import HeartbeatLoop
from .observability.logs import log_context
from .observability.metrics import MetricsSink, NoMetrics, TaskMetrics
from .ports import AudioEncoder, Backend, GenerationEngine, Lease
from .records import (
    CANCELLED, MODELS_META_KEY, TERMINAL, AudioFile, FailureReason, ModelEntry, ModelsMeta, StoredRequestInvalid,
    TaskRecord, TaskResult, WorkerHeartbeat,
)
from .post_stage import PostStage
from .run_watch import GenerationTimedOut, RunWatch, TasksGone
from .submission import SOURCE_ROLES
from .storage_errors import StorageFull
from .task_errors import TaskFailure, describe_failure
from .task_limits import over_ceiling, task_cost

log = logging.getLogger(__name__)

LOCAL_ADAPTERS_META_KEY = "adapters_local"  # read by the API (contract in /work/notes/adapters-contract.md)

SWEEP_INTERVAL_SECONDS = 600
DEAD_LETTER_INTERVAL_SECONDS = 30
LM_REQUIRED = ("this request needs the 5Hz LM (sample_mode / sample_query / use_format / analysis), "
               "which is not loaded on this server")


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
    """A task this worker holds: its lease, its attempt, and its request validated once."""
    lease: Lease
    attempt: int
    request: GenerationRequest
    inputs: dict[str, bytes]  # src_audio / reference_audio bytes
    batch_key: Optional[tuple[Any, ...]]  # engine.plan.batch_key: None means it runs alone
    created_at: float
    started_at: float
    given_back: int = 0  # earlier claims handed back on purpose (not lost deliveries)

    @property
    def task_id(self) -> str:
        return self.lease.task_id


class Worker:
    def __init__(self, settings: Settings, backend: Backend, engine: GenerationEngine,
                 worker_id: Optional[str] = None, on_stalled: Optional[Callable[[], None]] = None,
                 metrics: Optional[MetricsSink] = None, on_busy: Optional[Callable[[bool], None]] = None,
                 on_finished: Optional[Callable[[str], None]] = None, encoder: Optional[AudioEncoder] = None):
        self.settings = settings
        self.backend = backend
        self.engine = engine
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_stalled = on_stalled  # a generation is hung (see run_watch); the CLI exits here
        self.metrics: MetricsSink = metrics or NoMetrics()
        self.on_finished = on_finished  # a task this worker finished (webhooks); must not block
        # True as a task starts, False once idle: ECS task scale-in protection (service/aws/task_protection.py)
        self.on_busy = on_busy
        self.started_at = time.time()
        self.heartbeat_seconds = HEARTBEAT_SECONDS
        self.heartbeat_file: Optional[str] = None  # for the container health check (acestep-worker --healthcheck)
        self._watch: Optional[RunWatch] = None  # the engine call in progress, for the heartbeat
        self.stop_event = threading.Event()  # stop taking new work
        self.cancel_event = threading.Event()  # abandon the running task too (release its lease)
        # Backend housekeeping, each due on the first round and then every interval.
        self.dead_letter_chore = _Chore(backend.drain_dead_letters, DEAD_LETTER_INTERVAL_SECONDS,
                                        "marked %d dead-lettered task(s) failed", logging.WARNING)
        self.sweep_chore = _Chore(backend.sweep_expired, SWEEP_INTERVAL_SECONDS,
                                  "removed %d expired task(s)/upload(s)")
        # A task received while filling a batch that it did not fit: it runs first next round
        # rather than being handed back (a give-back would count as a failed delivery on SQS).
        # It is not claimed until it runs (so its attempt is not spent), and its lease is kept
        # alive while the current batch runs.
        self._carried: Optional[Lease] = None
        # The pipeline (ACESTEP_PIPELINE): a generated batch's encoding, storing and recording run in
        # the post-processing stage while the engine starts the next batch. Off: all in this thread.
        self._post: Optional[PostStage[_Claimed]] = None
        self._keeper: Optional[LeaseKeeper] = None
        # Encodes in other processes (its creator closes it); without one, the engine encodes and the
        # post-processing stage stores and records.
        self.encoder = encoder
        if pipeline_enabled(settings, engine):
            self._keeper = LeaseKeeper(backend, settings.visibility_timeout)
            self._post = PostStage(self._record, self.encoder, self._keeper, settings.pipeline_depth,
                                   self.cancel_event, encode_timeout=settings.stall_timeout)

    # -- lifecycle -------------------------------------------------------------------------

    @functools.cached_property
    def _lm_model(self) -> str:
        """The LM this worker runs, as its heartbeats say it (service/fleet.py reads them)."""
        return str(self.engine.describe().get("lm_model") or "none")

    def publish_models(self) -> None:
        """Tell the API what this worker serves (for /v1/models and /health)."""
        info = self.engine.describe()
        shapes = {str(m.get("name")): m["adapter_shape"] for m in info.get("models") or [] if m.get("adapter_shape")}
        meta = ModelsMeta(
            models=[ModelEntry(name=m.name, is_default=m.is_default, random_weights=m.random_weights,
                               task_types=list(m.task_types), adapter_shape=shapes.get(m.name))
                    for m in self.engine.models()],
            device=info.get("device"), dtype=info.get("dtype"), lm_model=info.get("lm_model", "none"),
            worker_id=self.worker_id, updated_at=time.time())
        self.backend.store.put_meta(MODELS_META_KEY, meta.model_dump())
        # the adapters a request may name on this worker's disk (the API lists and checks them from here)
        self.backend.store.put_meta(LOCAL_ADAPTERS_META_KEY, {
            "worker_id": self.worker_id, "updated_at": time.time(), "adapters": info.get("local_adapters") or []})

    def run_forever(self, poll_seconds: float = 5.0) -> None:
        with log_context(worker_id=self.worker_id):
            self.publish_models()
            if self._post is not None and self.encoder is not None:
                self.encoder.warm_up()
            with HeartbeatLoop(self.backend.store, self.heartbeat, self.heartbeat_seconds, self.stop_event,
                               also=lambda: self.metrics.queue_depth(self.backend.queue.size()),
                               file=self.heartbeat_file):
                log.info("worker %s ready", self.worker_id)
                full_since: Optional[float] = None
                while not self.stop_event.is_set():
                    try:
                        self.run_once(poll_seconds, overlap=True)
                        if full_since is not None:
                            log.warning("storage has room again after %.0f s: taking tasks", time.monotonic() - full_since)
                            full_since = None
                    except StorageFull as exc:  # an outage: wait it out, log once, take no task meanwhile
                        if full_since is None:
                            full_since = time.monotonic()
                            log.error("storage is full (%s): not taking tasks until there is room", exc)
                        self.stop_event.wait(_backoff(time.monotonic() - full_since))
                    except Exception:  # the loop must survive a backend hiccup
                        log.exception("worker loop error")
                        self.stop_event.wait(1.0)
                try:
                    if self._carried is not None:
                        self.backend.queue.release(self._carried)  # never claimed: a plain give-back
                        self._carried = None
                finally:
                    self.close()  # drains the post-processing stage (hands it back on a second signal)
                    self._signal_busy(False)
            log.info("worker %s stopped", self.worker_id)

    def heartbeat(self) -> WorkerHeartbeat:
        """This worker's state now: idle, or running which tasks (generating, then post-processing) and when
        the engine last progressed."""
        now, watch = time.time(), self._watch
        beat = WorkerHeartbeat(worker_id=self.worker_id, started_at=self.started_at, beat_at=now,
                               state="stopping" if self.stop_event.is_set() else "idle", lm_model=self._lm_model,
                               adapters=[f"{a['model']}/{a['name']}"
                                         for a in self.engine.describe().get("loaded_adapters") or []])
        posting = self._post.task_ids() if self._post is not None else []
        if watch is not None or posting:
            beat.state = "running"
            beat.task_ids = posting + ([lease.task_id for lease, _ in watch.tasks] if watch is not None else [])
        if watch is not None:
            beat.last_progress_at = now - (time.monotonic() - watch.last_progress)
        return beat

    def close(self) -> None:
        """Finish what the post-processing stage holds (hand it back once cancel_event is set), then stop
        its threads."""
        if self._post is not None:
            self._post.close()
            self._post.take_error()  # stopping: a storage outage met at the end changes nothing now
        if self._keeper is not None:
            self._keeper.close()

    def _raise_post_error(self) -> None:
        error = self._post.take_error() if self._post is not None else None
        if error is not None:
            raise error

    def request_stop(self, cancel_running: bool = False) -> None:
        self.stop_event.set()
        if cancel_running:
            self.cancel_event.set()

    # -- one round -------------------------------------------------------------------------

    def run_once(self, wait_seconds: float, overlap: bool = False) -> bool:
        """Process the next task (and compatible ones waiting behind it). False if none came.

        With the pipeline on, its encoding, storing and recording run in the post-processing stage:
        `overlap` returns as soon as the engine is done (run_forever; `close` drains), otherwise
        run_once returns once every task of the round is recorded."""
        self._raise_post_error()  # a recording in the post-processing stage found storage full
        self.dead_letter_chore.run_if_due()
        self.sweep_chore.run_if_due()
        if self.backend.has_room is not None and not self.backend.has_room():
            raise StorageFull(f"less than ACESTEP_MIN_FREE_MB ({self.settings.min_free_mb} MB) free")
        lease, self._carried = self._carried, None
        if lease is not None:
            self.backend.queue.extend(lease, self.settings.visibility_timeout)
        else:
            lease = self.backend.queue.receive(wait_seconds, self.settings.visibility_timeout)
            if lease is None:
                if self._post is None or self._post.idle():
                    self._signal_busy(False)
                return False
            if self.stop_event.is_set():  # arrived during a long poll after shutdown began
                self.backend.queue.release(lease)
                return False
        first = self._claim(lease)
        if first is None:
            return True
        batch = [first]
        if self.settings.batch_compatible_tasks and first.batch_key is not None:
            batch += self._claim_compatible(first)
        self._signal_busy(True)
        self._run(batch, overlap)
        return True

    def _signal_busy(self, busy: bool) -> None:
        if self.on_busy is None:
            return
        try:
            self.on_busy(busy)
        except Exception as exc:  # protection is an optimisation: the task runs either way
            log.warning("could not %s scale-in protection: %s", "set" if busy else "clear", exc)

    def _claim_compatible(self, first: _Claimed) -> list[_Claimed]:
        """Claim waiting tasks that can share one engine call with `first` (never waits).

        The first task that cannot join is carried over to the next round, unclaimed.
        """
        more: list[_Claimed] = []
        items = first.request.batch_size
        while items < MAX_BATCH and not self.stop_event.is_set():
            lease = self.backend.queue.receive(0, self.settings.visibility_timeout)
            if lease is None:
                break
            fits = self._fits(lease, first.batch_key, MAX_BATCH - items)
            if fits is False:
                self._carried = lease
                break
            # A request never changes after submit, so what fitted on the look fits now; an
            # unreadable or finished one is failed or dropped by the claim.
            claimed = self._claim(lease)
            if claimed is None:
                continue
            more.append(claimed)
            items += claimed.request.batch_size
        return more

    def _fits(self, lease: Lease, key: Optional[tuple[Any, ...]], room: int) -> Optional[bool]:
        """Whether the leased task can join a batch of `key` with `room` items left, from a look at
        its record (no claim). None: unknown (finished, missing or invalid), left to the claim."""
        record = self.backend.store.get(lease.task_id)
        if record is None or record.status in TERMINAL:
            return None
        request = record.request
        try:  # a stored request that no longer parses is read back unchecked (the claim refuses it)
            if request.needs_lm and not self.engine.lm_loaded:
                return None
            mine = plan.batch_key(request, request.model or self.settings.default_model or "", self.engine.lm_loaded,
                                  self.settings.batch_length_bucket)
            return mine is not None and mine == key and request.batch_size <= room
        except (TypeError, ValueError):
            return None

    def _claim(self, lease: Lease) -> Optional[_Claimed]:
        """Claim the task (one store write, which also returns it, its request parsed) and check it."""
        try:
            record = self.backend.store.claim(lease.task_id, self.worker_id)
        except StoredRequestInvalid as exc:
            with log_context(task_id=lease.task_id):
                self._fail_unclaimed(lease, str(exc), FailureReason.INVALID_REQUEST)
            return None
        if record is None:  # finished already (duplicate delivery) or unknown
            self.backend.queue.ack(lease)
            return None
        with log_context(task_id=record.task_id, attempt=record.attempt):
            return self._validate(lease, record)

    def _stalled(self, batch: list[_Claimed]) -> None:
        """The engine call is hung (run_watch). A task on its last delivery fails now with the timeout
        as its reason; the others' leases lapse so another worker retries them. Then the CLI exits."""
        for c in batch:
            # This delivery included. Each count can run high on one backend (duplicate SQS messages
            # add claims; unclaimed receives add to the embedded count), never both: the lower is right.
            lost = min(c.attempt - c.given_back, c.lease.receive_count)
            if lost >= self.settings.max_receives:
                self._fail(c.lease, c.attempt, f"generation timed out: no progress for {self.settings.stall_timeout:g} s "
                           f"(ACESTEP_STALL_TIMEOUT) on {lost} deliveries", FailureReason.STALL_TIMEOUT,
                           c.created_at, c.started_at)
        if self.on_stalled is not None:
            self.on_stalled()

    def _validate(self, lease: Lease, record: TaskRecord) -> Optional[_Claimed]:
        try:
            request = record.request  # parsed by the store's claim (StoredRequestInvalid otherwise)
            if request.needs_lm and not self.engine.lm_loaded:
                raise TaskFailure(LM_REQUIRED, FailureReason.LM_UNAVAILABLE)
            # The API checked the ceiling at submit; a task queued under a higher one, or written past the API,
            # is refused here before it costs anything (the same count, with what this worker runs).
            over = over_ceiling(task_cost(request, lm=self.engine.lm_loaded), self.settings.max_task_cost)
            if over:
                raise TaskFailure(f"refused before running: {over}", FailureReason.COST_REFUSED)
            # Only what the task uses is read (and later decoded): text2music ignores src_audio unless it is
            # analysed (full_analysis_only).
            # uploaded LoRA/LoKr adapters onto this worker's disk (the engine loads them from there)
            adapter_fetch.fetch_uploaded(self.backend.blobs, Path(self.settings.resolved_adapter_cache_dir),
                                         request.adapters, self.settings.max_adapter_bytes)
            inputs = {role: self._read_input(role, key) for role in SOURCE_ROLES
                      if (key := getattr(request, f"{role}_key"))
                      and not (role == "src_audio" and not plan.reads_source_audio(request))}
        except (GenerationError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, TaskFailure) else FailureReason.REJECTED
            self._fail(lease, record.attempt, str(exc), reason, record.created_at, record.started_at)
            return None
        key = plan.batch_key(request, request.model or self.settings.default_model or "", self.engine.lm_loaded,
                             self.settings.batch_length_bucket)
        return _Claimed(lease, record.attempt, request, inputs, key, record.created_at,
                        record.started_at or time.time(), record.given_back)

    def _read_input(self, role: str, key: str) -> bytes:
        # Checked again here: a presigned upload URL can replace the file after submission.
        limit = self.settings.max_upload_mb * 1024 * 1024
        size = self.backend.blobs.size(key)
        if size is not None and size > limit:
            raise TaskFailure(f"{role} upload is {size / 2**20:.1f} MB; the limit is {self.settings.max_upload_mb} MB",
                              FailureReason.INPUT_TOO_LARGE)
        try:
            return self.backend.blobs.get(key)
        except KeyError:
            raise TaskFailure(f"{role} upload {key!r} is missing from storage", FailureReason.INPUT_MISSING) from None

    def _run(self, batch: list[_Claimed], overlap: bool = False) -> None:
        # A batch's lines name all its tasks (`task_ids`, `attempts`; a lone task's `task_id`, `attempt`), each
        # outcome line its own: a field has one type on every line (an attempt is always an int).
        with log_context(**_task_fields(batch)):
            outcomes = self._generate(batch)
        if outcomes is None:
            return
        if self._post is None:
            self._record(batch, outcomes)
            return
        self._post.hand_over(batch, outcomes, hold=[self._carried] if self._carried is not None else [])
        if not overlap:
            self._post.wait_idle()
            self._raise_post_error()

    def _record(self, batch: Sequence[_Claimed], outcomes: list[GenerationResult | BaseException]) -> None:
        """Store and record each task's outcome, then ack it. Raises StorageFull (after handing the
        rest back) when there is no room for a result."""
        full: Optional[StorageFull] = None
        for c, outcome in zip(batch, outcomes):
            with log_context(task_id=c.task_id, attempt=c.attempt):
                if isinstance(outcome, GenerationCancelled):
                    self._give_back(c)
                elif isinstance(outcome, BaseException):
                    self._fail(c.lease, c.attempt, *describe_failure(outcome), c.created_at, c.started_at)
                elif full is not None:
                    self._give_back(c)
                else:
                    try:
                        self._succeed(c, outcome)
                    except StorageFull as exc:  # not the task's fault: hand it back, then back off
                        full = exc
                        log.error("no room to store the result of %s: handing it back", c.task_id)
                        self._give_back_quietly(c)
        if full is not None:
            raise full

    def _generate(self, batch: list[_Claimed]) -> Optional[list[GenerationResult | BaseException]]:
        """The engine's outcome per task, or None when there is nothing to record (released, hung)."""
        started = time.monotonic()
        watch = RunWatch(self.backend, [(c.lease, c.attempt) for c in batch],
                         keep_alive=[self._carried] if self._carried is not None else [],
                         visibility_timeout=self.settings.visibility_timeout,
                         generation_timeout=self.settings.generation_timeout,
                         stall_timeout=self.settings.stall_timeout, cancel_event=self.cancel_event,
                         on_stalled=lambda: self._stalled(batch))
        self._watch = watch
        # Pipelined with an encoder: the post-processing stage encodes, in other processes.
        encode = self._post is None or self.encoder is None
        outcomes: Optional[list[GenerationResult | BaseException]]
        with watch:
            try:
                if len(batch) == 1:
                    c = batch[0]
                    outcomes = [self.engine.generate(
                        c.request, src_audio=c.inputs.get("src_audio"),
                        reference_audio=c.inputs.get("reference_audio"), progress=watch, encode=encode)]
                else:
                    outcomes = self.engine.generate_batch([(c.request, c.inputs) for c in batch], progress=watch,
                                                          encode=encode)
            except GenerationTimedOut as exc:
                outcomes = [TaskFailure(str(exc), FailureReason.GENERATION_TIMEOUT)] * len(batch)
            except TasksGone:
                self._drop_gone(batch)
                outcomes = None
            except GenerationCancelled:
                for c in batch:
                    log.info("released %s for another worker (shutting down)", c.task_id)
                    self._give_back(c)
                outcomes = None
            except Exception as exc:  # an engine crash fails these tasks, with the reason
                log.exception("engine failed")
                outcomes = [exc] * len(batch)
            finally:
                self._watch = None
        if watch.stalled:  # the leases lapsed and the tasks may run elsewhere now: keep nothing
            log.warning("a hung generation returned after %.0f s; its tasks were left to other workers",
                        time.monotonic() - started)
            return None
        if outcomes is not None:
            log.info("ran %d task(s) in %.2fs", len(batch), time.monotonic() - started)
        return outcomes

    def _drop_gone(self, batch: list[_Claimed]) -> None:
        """The engine stopped because no task of the batch is ours: ack the cancelled ones; a task
        another attempt holds now is left to that attempt's lease."""
        records = self.backend.store.get_many([c.task_id for c in batch])
        for c in batch:
            record = records.get(c.task_id)
            if record is None or record.status == CANCELLED:
                log.info("task %s was cancelled: stopped its generation", c.task_id)
                self.backend.queue.ack(c.lease)
            else:
                log.warning("task %s is held by attempt %d now: stopped ours (%d)", c.task_id, record.attempt,
                            c.attempt)

    # -- outcomes --------------------------------------------------------------------------

    def _succeed(self, c: _Claimed, result: GenerationResult) -> None:
        keys: list[str] = []
        audios = []
        info = result.generation_info.copy()
        try:  # storage full part way: what this attempt wrote goes, and the outage is raised
            for i, audio in enumerate(result.audios):
                key = output_key(c.task_id, c.attempt, i, audio.format)
                self.backend.blobs.put(key, audio.data, audio.content_type)
                keys.append(key)
                audios.append(AudioFile(key=key, format=audio.format, seed=audio.seed,
                                        duration=round(audio.duration_seconds, 3),
                                        sample_rate=audio.sample_rate, channels=audio.channels))
            whole = TaskResult(audios=audios, metas=result.metas, generation_info=info,
                               dit_model=result.dit_model, lm_model=result.lm_model)
            finished = self.backend.store.finish(c.task_id, c.attempt, result=whole, blob_keys=keys)
        except StorageFull:
            for written in keys:
                self.backend.blobs.delete(written)
            raise
        if finished:
            log.info("task %s succeeded (%d file(s))", c.task_id, len(keys))
            self._report(TaskMetrics.succeeded(whole, c.created_at, c.started_at, time.time()))
            self._finished(c.task_id)
        else:  # another attempt finished it first; drop our copy
            for key in keys:
                self.backend.blobs.delete(key)
            log.warning("task %s was finished by another attempt; discarded attempt %d", c.task_id, c.attempt)
        self._ack(c.lease, c.attempt, finished)

    def _fail(self, lease: Lease, attempt: int, message: str, reason: FailureReason, created_at: float,
              started_at: Optional[float]) -> None:
        log.warning("task %s failed: %s", lease.task_id, message)
        finished = self.backend.store.finish(lease.task_id, attempt, error=message, reason=reason)
        if finished:
            self._report(TaskMetrics.failed(reason, created_at, started_at, time.time()))
            self._finished(lease.task_id)
        self._ack(lease, attempt, finished)

    def _fail_unclaimed(self, lease: Lease, message: str, reason: FailureReason) -> None:
        """A task that cannot even be claimed (its stored request no longer parses) fails as it is."""
        log.warning("task %s failed: %s", lease.task_id, message)
        self._stop_keeping(lease)
        if self.backend.store.fail_unfinished(lease.task_id, message, reason):
            record = self.backend.store.get(lease.task_id)
            created = record.created_at if record is not None else time.time()
            self._report(TaskMetrics.failed(reason, created, None, time.time()))
            self._finished(lease.task_id)
        self.backend.queue.ack(lease)

    def _finished(self, task_id: str) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(task_id)
            except Exception:  # a notification must never fail a task
                log.warning("could not queue the webhook of %s", task_id, exc_info=True)

    # -- the queue, fenced by the attempt ----------------------------------------------------

    def _ack(self, lease: Lease, attempt: int, finished: bool) -> None:
        """Remove the message once the task is finished. A worker fenced out of `finish` acks only when
        the task is finished (by anyone) or gone: while a newer attempt runs, the message is its
        lease, and an old receipt may still delete it on SQS."""
        self._stop_keeping(lease)
        if not finished:
            record = self.backend.store.get(lease.task_id)
            if record is not None and record.status not in TERMINAL:
                log.warning("lease of %s lost to attempt %d; leaving its message alone (attempt %d)",
                            lease.task_id, record.attempt, attempt)
                return
        self.backend.queue.ack(lease)

    def _stop_keeping(self, lease: Lease) -> None:
        """Before an ack or a release: the post-processing stage's keeper must not extend it afterwards
        (a late extension would hide a released task again)."""
        if self._keeper is not None:
            self._keeper.remove(lease)

    def _give_back_quietly(self, c: _Claimed) -> None:
        try:
            self._give_back(c)
        except Exception:  # the store may be full too: the lease lapses instead
            log.warning("could not hand %s back; its lease will lapse", c.task_id, exc_info=True)

    def _give_back(self, c: _Claimed) -> None:
        """Hand a claimed task back at once, unless a newer attempt holds it already. The store records
        the give-back (fenced by attempt), so it does not count as a lost delivery."""
        self._stop_keeping(c.lease)
        if self.backend.store.give_back(c.task_id, c.attempt):
            self.backend.queue.release(c.lease)
            return
        record = self.backend.store.get(c.task_id)
        if record is None or record.status in TERMINAL:  # cancelled or finished meanwhile
            self.backend.queue.ack(c.lease)
        else:
            log.warning("not giving back %s: attempt %d no longer holds it", c.task_id, c.attempt)

    def _report(self, metrics: TaskMetrics) -> None:
        try:
            self.metrics.task_finished(metrics)
        except Exception:  # metrics must never fail a task
            log.warning("could not report task metrics", exc_info=True)


def pipeline_enabled(settings: Settings, engine: GenerationEngine) -> bool:
    """ACESTEP_PIPELINE, or when auto: whether the engine runs on a GPU. On CPU the engine and the encoders
    compete for the same cores (bench/RESULTS.md: it gains at batch 1 and loses at batch 2-4 on 2 cores)."""
    if settings.pipeline is not None:
        return settings.pipeline
    return str(engine.describe().get("device") or "cpu").startswith("cuda")


def _backoff(outage_seconds: float) -> float:
    """1 s, doubling with the outage's length, at most a minute."""
    return min(60.0, max(1.0, outage_seconds))


def _task_fields(batch: Sequence[_Claimed]) -> dict[str, Any]:
    if len(batch) == 1:
        return {"task_id": batch[0].task_id, "attempt": int(batch[0].attempt)}
    return {"task_ids": [c.task_id for c in batch], "attempts": [int(c.attempt) for c in batch]}
