"""What the client raises. Every error is an ACEStepError; the CLI maps each kind to an exit code."""
from __future__ import annotations

from typing import Any, Optional


class ACEStepError(Exception):
    """Base class of everything this package raises."""


class ServerUnreachable(ACEStepError):
    """No HTTP answer at all (connection refused, DNS, TLS, read timeout)."""


class APIError(ACEStepError):
    """The server answered with an error: an HTTP 4xx/5xx, or upstream's soft `code: 500` envelope."""

    def __init__(self, status_code: int, detail: Any, *, method: str = "", path: str = ""):
        self.status_code = status_code
        self.detail = detail
        self.method, self.path = method, path
        where = f" ({method} {path})" if path else ""
        super().__init__(f"HTTP {status_code}{where}: {detail_text(detail)}")


class AuthError(APIError):
    """401/403: the API key is missing or wrong."""


class NotSupported(APIError):
    """The server has no such route (an upstream ACE-Step server has no cancel, for one)."""


class TaskFailed(ACEStepError):
    def __init__(self, task_id: str, error: str):
        self.task_id, self.error = task_id, error
        super().__init__(f"task {task_id} failed: {error}")


class WaitTimeout(ACEStepError):
    """The task did not finish within the wait's timeout; it may still be running on the server."""

    def __init__(self, task_id: str, timeout: float, last: Optional[object] = None):
        self.task_id, self.timeout, self.last = task_id, timeout, last
        super().__init__(f"task {task_id} did not finish within {timeout:g} s")


class WaitCancelled(ACEStepError):
    """The caller stopped the wait (sync client: the `cancel` event was set)."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"stopped waiting for task {task_id}")


def detail_text(detail: Any) -> str:
    """FastAPI's `detail` is a string, or a list of validation errors; make it one line."""
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(p) for p in err.get("loc", []) if p not in ("body", "query"))
                parts.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", err)))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)
