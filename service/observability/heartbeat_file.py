"""The worker's heartbeat as a local file, read by `acestep-worker --healthcheck` (the container check).

The store's heartbeat tells the API about every worker; this file tells the container runtime about
this one process without a network call. The check fails when the beats stop (the process is wedged)
or when a running task has reported no progress for ACESTEP_STALL_TIMEOUT (the engine is hung),
so ECS replaces the task even when the process cannot exit by itself.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..records import WorkerHeartbeat
from .health import ALIVE_WITHIN_SECONDS

STARTING_STATE = "starting"
# Fetching weights and loading the models may take this long before the first beat of the loop.
STARTUP_LIMIT_SECONDS = 1800.0


def write_beat(path: str, beat: WorkerHeartbeat) -> None:
    """Replace the file atomically, so the check never reads half a beat."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".beat-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(beat.model_dump_json())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def starting_beat(worker_id: str) -> WorkerHeartbeat:
    now = time.time()
    return WorkerHeartbeat(worker_id=worker_id, started_at=now, beat_at=now, state=STARTING_STATE)


def unhealthy_reason(path: str, stall_timeout: float, now: Optional[float] = None) -> Optional[str]:
    """None when the worker is healthy, else why not."""
    now = time.time() if now is None else now
    try:
        beat = WorkerHeartbeat.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        return f"no heartbeat file at {path}"
    except ValueError as exc:
        return f"unreadable heartbeat file {path}: {exc}"
    if beat.state == STARTING_STATE:
        loading = now - beat.started_at
        return None if loading < STARTUP_LIMIT_SECONDS else f"still loading models after {loading:.0f} s"
    if beat.age(now) > ALIVE_WITHIN_SECONDS:
        return f"last heartbeat {beat.age(now):.0f} s ago"
    if beat.state == "running" and beat.last_progress_at is not None:
        silent = now - beat.last_progress_at
        if silent > stall_timeout:
            return (f"no progress on {', '.join(beat.task_ids)} for {silent:.0f} s "
                    f"(ACESTEP_STALL_TIMEOUT {stall_timeout:g} s)")
    return None
