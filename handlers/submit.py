"""Submitting a parsed generation request: the one path both APIs (ACE-Step and OpenAI-compatible) take.

Blocking (server files, the blob store, the task store): call it in a thread. Service errors
become the HTTP errors of both APIs here.
"""
from __future__ import annotations

from typing import Optional

from service.config import Settings
from service.ports import Backend, CallerBusy, CallerLimits, QueueFull
from service.sources import SourceError, resolve_sources
from service.storage_errors import STORAGE_FULL_MESSAGE
from service.submission import submit_task
from service.task_limits import TaskRefused, check_task
from service.task_outputs import output_reader

from .envelope import ApiError
from .request_parsing import ParsedTask
from .submit_gate import SubmitGate

LM_NOT_SERVED = ("this request needs the 5 Hz LM (sample_mode / sample_query / use_format / analysis_only), "
                 "which the workers of this server do not load; start them with ACESTEP_INIT_LLM=true (and "
                 "ACESTEP_LM_MODEL_PATH), or send caption, lyrics and metadata yourself")


def submit_parsed(settings: Settings, backend: Backend, parsed: ParsedTask,
                  idempotency_key: Optional[str] = None, webhook_url: Optional[str] = None,
                  caller: Optional[str] = None, gate: Optional[SubmitGate] = None) -> tuple[str, Optional[int]]:
    """(task_id, queue_position); ApiError 503 (no worker can run it), 400/413 (sources, LM), 429 (queue
    full). `webhook_url` comes checked (handlers/webhook_url.py: on the request path, its lookup off the
    event loop and bounded). `gate`: the app's SubmitGate (remembers a healthy fleet for a moment);
    without one, the store is read."""
    gate = gate or SubmitGate(backend, accept_seconds=0)
    refusal = gate.unservable_reason()
    if refusal:  # every live worker failed to load its models: the task would only wait
        raise ApiError(503, refusal, headers={"Retry-After": "60"})
    if parsed.request.needs_lm and not gate.lm_served():
        raise ApiError(400, LM_NOT_SERVED)
    if backend.has_room is not None and not backend.has_room():
        raise ApiError(507, STORAGE_FULL_MESSAGE, headers={"Retry-After": "60"})
    try:
        sources = resolve_sources(parsed.sources, backend.blobs, allowed_dirs=settings.allowed_audio_dirs,
                                  max_bytes=settings.max_upload_bytes,
                                  outputs=output_reader(backend.store, backend.blobs, settings.max_upload_bytes))
    except SourceError as exc:
        raise ApiError(413 if exc.kind == "too_large" else 400, exc.message) from None
    request_dump = parsed.request.model_dump() | {f"{role}_key": key for role, key in sources.keys.items()}
    try:
        check_task(parsed.request, request_dump, settings.max_task_cost,
                   has_source="src_audio" in sources.uploads or "src_audio" in sources.keys)
    except TaskRefused as exc:
        raise ApiError(exc.status, exc.message) from None
    limits = CallerLimits(settings.caller_max_queued, settings.caller_max_active) if caller else None
    try:
        return submit_task(backend, request_dump, settings.queue_maxsize, uploads=sources.uploads,
                           idempotency_key=idempotency_key, webhook_url=webhook_url, owner=caller,
                           caller_limits=limits)
    except CallerBusy as exc:
        raise ApiError(429, str(exc), headers={"Retry-After": "30"}) from None
    except QueueFull:
        raise ApiError(429, "Server busy: queue is full", headers={"Retry-After": "5"}) from None


__all__ = ["LM_NOT_SERVED", "submit_parsed"]
