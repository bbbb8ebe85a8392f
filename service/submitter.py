"""Submitting a task: the use case behind /release_task, the chat API and /format_input.

A route turns its body into a `SubmitTask` and makes one call, `Submitter.submit`. Everything that
may refuse the task is decided here, in this order: the webhook URL, the fleet (no worker can run
it; the 5 Hz LM it needs is not served), the storage's room, its adapters (service/adapter_resolution.py:
unknown, or not fitting the model), the sources, the cost ceiling, then the
caller's limits and the queue bound inside the write that creates it. A refusal is a `Refused`
(service/refusals.py) that the API maps to a response in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import anyio.to_thread

from engine.request import GenerationRequest

from .adapter_services import AdapterServices
from .caller_limits import Caller
from .config import Settings
from .fleet import Fleet, served_model_names
from .ports import Backend, CallerLimits
from .refusals import LMNotReported, LMNotServed, NoWorker, StorageFull, WebhookRejected
from .sources import AudioSource, resolve_sources
from .submission import new_task_id, place_sources, submit_task
from .task_limits import check_task
from .task_outputs import output_reader
from .webhooks import WebhookRefused, vet_target

LM_NOT_SERVED = ("this request needs the 5 Hz LM (sample_mode / sample_query / use_format / analysis_only), "
                 "which the workers of this server do not load; start them with ACESTEP_INIT_LLM=true (and "
                 "ACESTEP_LM_MODEL_PATH), or send caption, lyrics and metadata yourself")
LM_UNAVAILABLE = ("The 5Hz LM is not loaded on this server, so /format_input and /v1/create_sample are unavailable. "
                  "Run a worker with the LM enabled (ACESTEP_INIT_LLM=true and an LM model), or send "
                  "the caption and lyrics to /release_task as they are.")


@dataclass(frozen=True)
class SubmitTask:
    request: GenerationRequest
    caller: Caller  # counts against this caller's limits; recorded as the task's owner
    sources: tuple[AudioSource, ...] = ()  # where its audio comes from, as the client declared it
    idempotency_key: Optional[str] = None
    webhook_url: Any = None  # as the client sent it: vetted here
    # The caller waits for the answer now (/format_input): a worker must have said it runs the LM; one
    # that may be started on demand is too late.
    answer_now: bool = False
    # Upstream's chat fallback: a guessed sample query becomes the caption when no worker runs the LM.
    query_as_caption_without_lm: bool = False


@dataclass(frozen=True)
class Submitted:
    task_id: str
    queue_position: Optional[int]
    query_as_caption: bool = False  # the fallback above was taken: the LM will not write the song


class Submitter:
    def __init__(self, settings: Settings, backend: Backend, fleet: Optional[Fleet] = None,
                 adapters: Optional[AdapterServices] = None):
        self.settings, self.backend = settings, backend
        self.fleet = fleet if fleet is not None else Fleet(backend)
        self.adapters = adapters if adapters is not None else AdapterServices.build(settings, backend)

    async def submit(self, command: SubmitTask) -> Submitted:
        """The task as queued, or a Refused. The webhook's name lookup waits on the event loop (bounded);
        the rest reads the server's files, the blob store and the task store in a worker thread."""
        webhook_url = await self._vet_webhook(command.webhook_url)
        return await anyio.to_thread.run_sync(self.submit_blocking, command, webhook_url)

    async def _vet_webhook(self, value: Any) -> Optional[str]:
        if value is None or value == "":
            return None
        try:
            await vet_target(value, self.settings.webhook_allow_private)
        except WebhookRefused as exc:
            raise WebhookRejected(str(exc)) from None
        return str(value)

    def submit_blocking(self, command: SubmitTask, webhook_url: Optional[str] = None) -> Submitted:
        """submit() after the webhook check (`webhook_url` comes vetted); blocking."""
        settings, backend = self.settings, self.backend
        lm = self.fleet.runs_lm() if command.answer_now else None  # asked once per submit, if at all
        if command.answer_now and lm is not True:
            raise LMNotReported(LM_UNAVAILABLE)
        reason = self.fleet.unservable_reason()
        if reason:
            raise NoWorker(reason)
        request, fallback = command.request, False
        if request.needs_lm and (lm if command.answer_now else self.fleet.runs_lm()) is False:
            if command.query_as_caption_without_lm and request.sample_query:
                request, fallback = query_as_caption(request), True
            if request.needs_lm:
                raise LMNotServed(LM_NOT_SERVED)
        if backend.has_room is not None and not backend.has_room():
            raise StorageFull("less than ACESTEP_MIN_FREE_MB free")
        request = with_model(request, next(iter(served_model_names(settings, backend)), None))
        request = self.adapters.resolution.resolve(request)  # named (or the default), found, fitting the model
        sources = resolve_sources(command.sources, backend.blobs, allowed_dirs=settings.allowed_audio_dirs,
                                  max_bytes=settings.max_upload_bytes,
                                  outputs=output_reader(backend.store, backend.blobs, settings.max_upload_bytes))
        request = request.model_copy(update={f"{role}_key": key for role, key in sources.keys.items()})
        task_id = new_task_id()
        check_task(place_sources(task_id, request, sources.uploads).request, settings.max_task_cost)  # as stored
        limits = CallerLimits(settings.caller_max_queued, settings.caller_max_active)
        task_id, position = submit_task(backend, request, settings.queue_maxsize, uploads=sources.uploads,
                                        task_id=task_id, idempotency_key=command.idempotency_key,
                                        webhook_url=webhook_url,
                                        owner=command.caller.id, caller_limits=limits)
        return Submitted(task_id, position, fallback)


def with_model(request: GenerationRequest, default_model: Optional[str]) -> GenerationRequest:
    """The request naming the model it runs on: the one it asked for, else this server's default (the first
    of ACESTEP_CONFIG_PATH*, the names requests are validated against, which the deployment gives the API and
    the workers alike). With no models configured here it stays unnamed and the worker runs its own default."""
    if request.model or not default_model:
        return request
    return request.model_copy(update={"model": default_model})


def query_as_caption(request: GenerationRequest) -> GenerationRequest:
    """The request with its sample query as the caption and no sample mode (both fields share one limit)."""
    return request.model_copy(update={"prompt": request.sample_query, "sample_query": "", "sample_mode": False})


__all__ = ["LM_NOT_SERVED", "LM_UNAVAILABLE", "SubmitTask", "Submitted", "Submitter", "query_as_caption", "with_model"]
