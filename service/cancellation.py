"""Cancelling a task for its client: a queued one never runs, a running one stops at its worker's
next progress write (RunWatch: within PROGRESS_MIN_SECONDS of a diffusion step), and the status
becomes "cancelled" either way."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from .observability.logs import log_context
from .ports import Backend
from .records import CANCELLED, TaskRecord

log = logging.getLogger(__name__)

CANCEL_REASON = "cancelled by the client"


@dataclass
class CancelOutcome:
    record: Optional[TaskRecord]  # None: no such task
    cancelled_now: bool  # False: it had finished already (or was cancelled before)


def cancel_task(backend: Backend, task_id: str, reason: str = CANCEL_REASON,
                on_cancelled: Optional[Callable[[str], None]] = None) -> CancelOutcome:
    """`on_cancelled` (webhooks) runs once, when this call is the one that cancelled the task."""
    with log_context(task_id=task_id):
        changed = backend.store.cancel(task_id, reason)
        record = backend.store.get(task_id)
        if changed:
            log.info("task %s cancelled (%s)", task_id, reason)
            if on_cancelled is not None:
                on_cancelled(task_id)
    return CancelOutcome(record, changed and record is not None and record.status == CANCELLED)


__all__ = ["CANCEL_REASON", "CancelOutcome", "cancel_task"]
