"""Batch assembly: claim a leased task, check it, and gather the waiting tasks that can share its engine call.

A task that cannot run here (its request needs the LM this worker lacks, costs too much, or names an
input that is missing or too large) fails at once with its reason, through the outcome recorder.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine import plan
from engine.request import MAX_BATCH, GenerationRequest
from engine.types import GenerationError

from . import adapter_fetch
from .config import Settings
from .observability.logs import log_context
from .ports import Backend, GenerationEngine, Lease
from .records import TERMINAL, FailureReason, TaskRecord
from .submission import SOURCE_ROLES
from .task_errors import TaskFailure
from .task_limits import over_ceiling, task_cost
from .worker_outcomes import HeldTask, OutcomeRecorder

log = logging.getLogger(__name__)

LM_REQUIRED = ("this request needs the 5Hz LM (sample_mode / sample_query / use_format / analysis), "
               "which is not loaded on this server")


@dataclass
class ClaimedTask(HeldTask):
    """A claimed task with its request validated once and its inputs read."""
    request: GenerationRequest
    inputs: dict[str, bytes]  # src_audio / reference_audio bytes, as the engine takes them
    batch_key: Optional[tuple[Any, ...]]  # engine.plan.batch_key: None means it runs alone
    given_back: int = 0  # earlier claims handed back on purpose (not lost deliveries)


class BatchAssembler:
    def __init__(self, settings: Settings, backend: Backend, engine: GenerationEngine, worker_id: str,
                 recorder: OutcomeRecorder, stop_event: threading.Event):
        self.settings, self.backend, self.engine = settings, backend, engine
        self.worker_id, self.recorder, self.stop_event = worker_id, recorder, stop_event
        # A task received while filling a batch that it did not fit: it runs first next round
        # rather than being handed back (a give-back would count as a failed delivery on SQS).
        # It is not claimed until it runs (so its attempt is not spent), and its lease is kept
        # alive while the current batch runs.
        self.carried: Optional[Lease] = None
        # Models POST /v1/init replaced on this worker -> why: a queued task naming one fails with that reason
        # (MODEL_UNLOADED) instead of running on another model than its record says.
        self.unloaded_models: dict[str, str] = {}

    def take_carried(self) -> Optional[Lease]:
        """The task carried over from the last round, its lease extended for this one."""
        lease, self.carried = self.carried, None
        if lease is not None:
            self.backend.queue.extend(lease, self.settings.visibility_timeout)
        return lease

    def assemble(self, lease: Lease) -> list[ClaimedTask]:
        """The leased task, claimed, and the compatible ones waiting behind it; empty when it cannot run."""
        first = self._claim(lease)
        if first is None:
            return []
        batch = [first]
        if self.settings.batch_compatible_tasks and first.batch_key is not None and self.carried is None:
            batch += self._claim_compatible(first)  # not while one is held over: it would be replaced
        return batch

    def _claim_compatible(self, first: ClaimedTask) -> list[ClaimedTask]:
        """Claim waiting tasks that can share one engine call with `first` (never waits).

        The first task that cannot join is carried over to the next round, unclaimed.
        """
        more: list[ClaimedTask] = []
        items = first.request.batch_size
        while items < MAX_BATCH and not self.stop_event.is_set():
            lease = self.backend.queue.receive(0, self.settings.visibility_timeout)
            if lease is None:
                break
            fits = self._fits(lease, first.batch_key, MAX_BATCH - items)
            if fits is False:
                self.carried = lease
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
            mine = self._batch_key(request)
            return mine is not None and mine == key and request.batch_size <= room
        except (TypeError, ValueError):
            return None

    def _batch_key(self, request: GenerationRequest) -> Optional[tuple[Any, ...]]:
        return plan.batch_key(request, request.model or self.settings.default_model or "", self.engine.lm_loaded,
                              self.settings.batch_length_bucket)

    def _claim(self, lease: Lease) -> Optional[ClaimedTask]:
        """Claim the task (OutcomeRecorder.claim) and check it."""
        record = self.recorder.claim(lease, self.worker_id)
        if record is None:
            return None
        with log_context(task_id=record.task_id, attempt=record.attempt):
            return self._validate(lease, record)

    def _validate(self, lease: Lease, record: TaskRecord) -> Optional[ClaimedTask]:
        try:
            request = record.request  # parsed by the store's claim (StoredRequestInvalid otherwise)
            if request.model in self.unloaded_models:
                raise TaskFailure(self.unloaded_models[request.model], FailureReason.MODEL_UNLOADED)
            if request.needs_lm and not self.engine.lm_loaded:
                raise TaskFailure(LM_REQUIRED, FailureReason.LM_UNAVAILABLE)
            # The API checked the ceiling at submit; a task queued under a higher one, or written past the API,
            # is refused here before it costs anything (the same count, with what this worker runs).
            over = over_ceiling(task_cost(request, lm=self.engine.lm_loaded), self.settings.max_task_cost)
            if over:
                raise TaskFailure(f"refused before running: {over}", FailureReason.COST_REFUSED)
            # uploaded LoRA/LoKr adapters onto this worker's disk (the engine loads them from there)
            adapter_fetch.fetch_uploaded(self.backend.blobs, Path(self.settings.resolved_adapter_cache_dir),
                                         request.adapters, self.settings.max_adapter_bytes)
            # Only what the task uses is read (and later decoded): text2music ignores src_audio unless it is
            # analysed (full_analysis_only).
            inputs = {role: self._read_input(role, key) for role in SOURCE_ROLES
                      if (key := getattr(request, f"{role}_key"))
                      and not (role == "src_audio" and not plan.reads_source_audio(request))}
        except (GenerationError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, TaskFailure) else FailureReason.REJECTED
            held = HeldTask(lease, record.attempt, record.created_at, record.started_at)
            self.recorder.fail(held, str(exc), reason)
            return None
        return ClaimedTask(lease, record.attempt, record.created_at, record.started_at or time.time(),
                           request, inputs, self._batch_key(request), record.given_back)

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
