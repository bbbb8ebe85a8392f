"""ECS task scale-in protection, set through the container agent's endpoint ($ECS_AGENT_URI).

While a worker runs a task it asks ECS not to choose its task when the service scales in; once it
is idle it clears that, so the service can shrink to zero. Protection also expires by itself
(ExpiresInMinutes), so a worker that dies while protected does not pin capacity for long.

The agent answers 200 with {"protection": {...}}, or {"failure": {...}} / {"error": {...}}
(the latter also with 4xx/5xx statuses); anything but "protection" raises TaskProtectionError.
"""
from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

STATE_PATH = "/task-protection/v1/state"
MAX_MINUTES = 2880  # the longest protection ECS grants in one call (48 h)
EXPIRY_MARGIN_MINUTES = 10  # upload and bookkeeping after the engine call


class TaskProtectionError(RuntimeError):
    """The agent refused or could not be reached."""


def minutes_for(generation_timeout: float) -> int:
    """Protection long enough for one task to reach ACESTEP_GENERATION_TIMEOUT and be stored."""
    return max(1, min(MAX_MINUTES, math.ceil(generation_timeout / 60) + EXPIRY_MARGIN_MINUTES))


class EcsTaskProtection:
    def __init__(self, agent_uri: str, expires_minutes: int, timeout_seconds: float = 3.0):
        self.url = agent_uri.rstrip("/") + STATE_PATH
        self.expires_minutes = max(1, min(MAX_MINUTES, int(expires_minutes)))
        self.timeout_seconds = timeout_seconds
        self.protected: Optional[bool] = None  # as last confirmed by the agent; None: unknown

    @classmethod
    def from_environment(cls, generation_timeout: float,
                         environ: Mapping[str, str] = os.environ) -> Optional["EcsTaskProtection"]:
        """The agent's endpoint when running as an ECS task (the agent sets ECS_AGENT_URI), else None."""
        uri = environ.get("ECS_AGENT_URI", "")
        return cls(uri, minutes_for(generation_timeout)) if uri else None

    def busy(self) -> None:
        """Protect the task, or renew its expiry: called as each task starts."""
        self._put({"ProtectionEnabled": True, "ExpiresInMinutes": self.expires_minutes})
        self.protected = True

    def idle(self) -> None:
        """Let ECS scale this task in again (skipped when already cleared)."""
        if self.protected is False:
            return
        self._put({"ProtectionEnabled": False})
        self.protected = False

    def set_busy(self, busy: bool) -> None:
        self.busy() if busy else self.idle()

    def _put(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="PUT",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                payload = _json(response.read())
        except urllib.error.HTTPError as exc:
            payload = _json(exc.read())
            raise TaskProtectionError(f"task protection refused (HTTP {exc.code}): {_reason(payload)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TaskProtectionError(f"ECS agent unreachable at {self.url}: {exc}") from None
        if "protection" not in payload:
            raise TaskProtectionError(f"task protection refused: {_reason(payload)}")
        protection = payload["protection"]
        if not isinstance(protection, dict):
            raise TaskProtectionError(f"task protection answered without a protection object: {_reason(payload)}")
        return protection


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": {"Message": raw[:200].decode(errors="replace")}}
    return value if isinstance(value, dict) else {}


def _reason(payload: dict[str, Any]) -> str:
    detail = payload.get("failure") or payload.get("error") or payload
    if isinstance(detail, dict):
        parts = [str(detail.get(k)) for k in ("Code", "Reason", "Message", "Detail") if detail.get(k)]
        if parts:
            return ": ".join(parts)
    return json.dumps(payload)[:200]
