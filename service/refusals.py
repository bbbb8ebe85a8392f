"""Why the service will not take a task now: the `Refused` family, free of HTTP.

Each refusal carries what a client needs to act on it: a status in HTTP's numbering (the one
vocabulary both APIs speak), the seconds after which a retry may succeed (None: retrying the same
request will not help) and a client-facing `detail`. The API maps them to responses in one place
(handlers/envelope.py).
"""
from __future__ import annotations

from typing import ClassVar, Optional


STORAGE_FULL_MESSAGE = "the server's storage is full; try again later"


class Refused(Exception):
    status: int = 400
    retry_after: Optional[int] = None
    # When set, what the client is told whatever the text raised with (kept for logs): an adapter's
    # wording ("7 tasks waiting (max 7)") is not the API's.
    public_detail: ClassVar[Optional[str]] = None

    @property
    def detail(self) -> str:
        return self.public_detail or str(self)


class NoWorker(Refused):
    """Every live worker failed to load its models: the task would only wait."""
    status, retry_after = 503, 60


class LMNotServed(Refused):
    """The request needs the 5 Hz LM and no worker runs one (400: send the request without LM features)."""
    status = 400


class LMNotReported(LMNotServed):
    """A caller that waits for the answer now (/format_input) needs a worker that has said it runs the LM."""
    status = 503


class SourceRejected(Refused):
    """A source or reference audio cannot be used (not found, not allowed, too large: 413)."""
    status = 400


class AdapterRejected(Refused):
    """An adapter the request (or the server's default) names does not exist here, or does not fit the model;
    an uploaded adapter that is not a valid LoRA/LoKr for the model it names."""
    status = 400


class AdapterConflict(Refused):
    """An upload would take a name another adapter already has."""
    status = 409


class AdapterUnknown(Refused):
    """DELETE /v1/adapters/{name} names no uploaded adapter."""
    status = 404


class AdapterTooLarge(Refused):
    """An uploaded adapter is over ACESTEP_MAX_ADAPTER_MB."""
    status = 413


class ModelsFixed(Refused):
    """A request to load a model the fleet does not run: its models are chosen where its workers start (a deploy
    on AWS, a restart on one machine), not by a request (/v1/init, /v1/reinitialize)."""
    status = 409


class WebhookRejected(Refused):
    """The webhook_url may not be called (does not parse, a private address, does not resolve in time)."""
    status = 400


class TooCostly(Refused):
    """The task is over the cost ceiling, or its request too large to store."""
    status = 413


class CallerBusy(Refused):
    """This caller has reached its limits on tasks in flight; created nothing."""
    status, retry_after = 429, 30


class QueueFull(Refused):
    """The backlog is at ACESTEP_QUEUE_MAXSIZE; created nothing."""
    status, retry_after = 429, 5
    public_detail = "Server busy: queue is full"


class StorageFull(Refused):
    """The backend's storage has no room left (ENOSPC / EDQUOT / SQLite 'database or disk is full')."""
    status, retry_after = 507, 60
    public_detail = STORAGE_FULL_MESSAGE


__all__ = ["AdapterConflict", "AdapterRejected", "AdapterTooLarge", "AdapterUnknown", "CallerBusy", "LMNotReported", "LMNotServed", "ModelsFixed", "NoWorker", "QueueFull", "Refused", "SourceRejected",
           "StorageFull", "TooCostly", "WebhookRejected"]
