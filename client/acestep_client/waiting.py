"""Waiting for a task, apart from how the wait sleeps.

`Waiting` decides everything: fed each poll's answer (a status, or the error the poll raised), it
says how many seconds to sleep before the next poll, or ends the wait with the finished status or an
error. It does no I/O and reads only its clock, so the sync client (time.sleep, or its cancel event)
and the async client (asyncio.sleep) are each a few lines of loop around it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

from .errors import ACEStepError, APIError, AuthError, ServerUnreachable, TaskFailed, WaitTimeout
from .types import TaskState, TaskStatus

OnUpdate = Callable[[TaskStatus], None]
Clock = Callable[[], float]
Answer = Union[TaskStatus, ACEStepError]  # what one poll brought: the status, or the error it raised


def retryable(exc: BaseException) -> bool:
    """Worth polling again: the network blinked, the server was busy or restarting."""
    if isinstance(exc, ServerUnreachable):
        return True
    return isinstance(exc, APIError) and not isinstance(exc, AuthError) and exc.status_code in (429, 502, 503, 504)


def visible(status: TaskStatus) -> tuple:
    """What a person following the task sees: state, queue position, stage, whole percent."""
    return (status.state, status.queue_position, status.stage, int(100 * status.progress))


class Backoff:
    """The polling schedule: start at `initial`, grow by `factor` up to `maximum`; back to `initial` when
    the task moves, so a running task is followed closely and a long queue is polled gently."""

    def __init__(self, timeout: Optional[float], initial: float = 0.5, maximum: float = 5.0, factor: float = 1.5,
                 clock: Clock = time.monotonic):
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self.delay = initial
        self._clock = clock
        self.deadline = None if timeout is None else clock() + timeout
        self._last: Any = None

    def next_delay(self, seen: Any) -> Optional[float]:
        """Seconds to sleep before the next poll, or None when the deadline has passed."""
        if seen != self._last:
            self._last, self.delay = seen, self.initial
        else:
            self.delay = min(self.maximum, self.delay * self.factor)
        if self.deadline is None:
            return self.delay
        left = self.deadline - self._clock()
        return None if left <= 0 else min(self.delay, left)


class Waiting:
    """One wait for one task. `step(answer)` after each poll returns the finished status (the wait is
    over) or the seconds to sleep before polling again. It raises TaskFailed for a failed or cancelled
    task (unless `raise_on_failure` is False), WaitTimeout once `timeout` has passed, and a poll's error
    that is not worth retrying (transient ones, `retryable`, are polled through until the timeout).
    `on_update` hears of each visible change and of the final status, not of every poll."""

    def __init__(self, task_id: str, *, timeout: Optional[float], on_update: Optional[OnUpdate] = None,
                 raise_on_failure: bool = True, poll_interval: float = 0.5, max_interval: float = 5.0,
                 clock: Clock = time.monotonic):
        self.task_id, self.timeout = task_id, timeout
        self.on_update, self.raise_on_failure = on_update, raise_on_failure
        self._backoff = Backoff(timeout, poll_interval, max_interval, clock=clock)
        self._reported: Optional[tuple] = None  # what on_update saw last: it hears of changes only

    def step(self, answer: Answer) -> Union[TaskStatus, float]:
        if isinstance(answer, ACEStepError):
            if not retryable(answer):
                raise answer
            seen: Any = "error"
        else:
            seen = visible(answer)
            if self.on_update and (answer.finished or seen != self._reported):
                self.on_update(answer)
            self._reported = seen
            if answer.finished:
                if self.raise_on_failure and answer.state is not TaskState.SUCCEEDED:
                    raise TaskFailed(self.task_id, answer.error or "")
                return answer
        delay = self._backoff.next_delay(seen)
        if delay is None:
            raise WaitTimeout(self.task_id, self.timeout or 0.0)
        return delay
