"""Is the service well? The store and the queue answer, and some worker is alive when work waits.

Workers beat every HEARTBEAT_SECONDS; one silent for ALIVE_WITHIN_SECONDS counts as down. No live
worker with an empty queue is healthy (AWS scales workers to zero when idle); no live worker while
tasks wait is not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..gpu_status import worker_view
from ..ports import Backend
from ..records import WorkerHeartbeat

HEARTBEAT_SECONDS = 15.0
FAILED_STATE = "failed"
ALIVE_WITHIN_SECONDS = 3 * HEARTBEAT_SECONDS


@dataclass
class HealthReport:
    reasons: list[str] = field(default_factory=list)
    store_ok: bool = True
    queue_ok: bool = True
    waiting: Optional[int] = None
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "degraded" if self.reasons else "ok"

    @property
    def serving(self) -> bool:
        """False when the API cannot accept or answer for tasks (store or queue down)."""
        return self.store_ok and self.queue_ok


def _error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def check_health(backend: Backend, stall_timeout: float, now: Optional[float] = None,
                 name_tasks: bool = False) -> HealthReport:
    """`name_tasks`: the running tasks' ids in `workers` and `reasons`, for a caller holding the API key
    only (/health answers anyone: the ids would let a stranger read and cancel others' tasks)."""
    now = time.time() if now is None else now
    report = HealthReport()
    beats: list[WorkerHeartbeat] = []
    try:
        beats = backend.store.heartbeats()
    except Exception as exc:
        report.store_ok = False
        report.reasons.append(f"task store unreachable ({_error(exc)})")
    try:
        report.waiting = backend.queue.size()
    except Exception as exc:
        report.queue_ok = False
        report.reasons.append(f"queue unreachable ({_error(exc)})")
    alive = alive_only(beats, now)
    report.workers = [_describe(b, now, name_tasks) for b in alive]
    for b in alive:
        if b.state == FAILED_STATE:
            report.reasons.append(f"worker {b.worker_id} cannot serve: {b.error}")
    if report.store_ok and report.waiting and not healthy(alive):
        last = max((b.beat_at for b in beats), default=None)
        since = f"the last heartbeat was {now - last:.0f} s ago" if last else "no worker has reported"
        report.reasons.append(f"{report.waiting} task(s) waiting and no working worker alive ({since})")
    for b in alive:
        if b.state == "running" and b.last_progress_at is not None and now - b.last_progress_at > stall_timeout:
            report.reasons.append(f"worker {b.worker_id}: no progress for {now - b.last_progress_at:.0f} s on "
                                  f"{(name_tasks and ', '.join(b.task_ids)) or 'its task'}")
    return report


def alive_only(beats: list[WorkerHeartbeat], now: float) -> list[WorkerHeartbeat]:
    """The workers that beat within ALIVE_WITHIN_SECONDS."""
    return [b for b in beats if b.age(now) <= ALIVE_WITHIN_SECONDS]


def healthy(beats: list[WorkerHeartbeat]) -> list[WorkerHeartbeat]:
    return [b for b in beats if b.state != FAILED_STATE]


def unservable_reason(backend: Backend, now: Optional[float] = None) -> Optional[str]:
    """Why nothing could run a new task now: every live worker failed to load its engine.

    None when some worker works, or when none is alive at all (workers may be scaled to zero and
    start on demand, so a quiet fleet is not a reason to refuse work).
    """
    now = time.time() if now is None else now
    alive = alive_only(backend.store.heartbeats(), now)
    if not alive or healthy(alive):
        return None
    return "no worker can run tasks: " + "; ".join(f"{b.worker_id}: {b.error}" for b in alive)


def _describe(beat: WorkerHeartbeat, now: float, name_tasks: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"worker_id": beat.worker_id, "state": beat.state, "last_beat_s_ago": round(beat.age(now), 1),
                 "tasks": len(beat.task_ids)}
    if name_tasks:
        out["task_ids"] = beat.task_ids
    if beat.error:
        out["error"] = beat.error
    if beat.last_progress_at is not None:
        out["last_progress_s_ago"] = round(max(0.0, now - beat.last_progress_at), 1)
    if beat.devices is not None:
        out["devices"] = worker_view(beat.devices)
    return out
