"""POST /v1/chat/completions, GET /v1/models (and /api/v1/models), GET /health of the OpenAI-compatible API.

`chat_router` (the completions) is served on both listeners, as upstream's API server mounts its
adapter beside its own routes; `router` (models, health) only on the chat listener, since the ACE-Step
API has its own /v1/models and /health.

A completion is an ordinary task: submitted through the same path as /release_task (same queue,
workers, limits and validation), then waited for while the request is open. If the client
disconnects first, the task is cancelled (nobody could collect it). If the wait reaches its limit
(OPENROUTER_MAX_WAIT, else ACESTEP_GENERATION_TIMEOUT) the task goes on: the 504 (or the stream's
last chunk) names it, and the ACE-Step API's /query_result returns it when done.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from service.config import Settings
from service.fleet import served_model_names
from service.json_types import JSONObject
from service.observability.health import check_health
from service.records import CANCELLED, SUCCEEDED, FailureReason, TaskRecord
from service.submitter import SubmitTask

from ..body import _json_object, read_limited
from ..body_budget import release_body
from ..caller import caller_of
from ..deps import backend_of, settings_of, submitter_of, webhooks_of
from ..envelope import ApiError, bad_request
from ..off_loop import parse_off_loop
from ..openapi_bodies import JSON, error_responses, model_schema, request_body
from ..request_parsing import validation_message
from ..routes_info import model_list
from . import responses
from .auth import require_key
from .convert import MODEL_PREFIX, ChatTask, MessageError, to_task
from .schema import ChatCompletionRequest
from .waiting import Tick, cancel_in_background, ticks

router = APIRouter(tags=["openai-compatible"])
chat_router = APIRouter(tags=["openai-compatible"])

HEARTBEAT_SECONDS = 2.0
TASK_HEADER = "X-Task-ID"
MODELS_CREATED = 1767225600  # 2026-01-01: a fixed date, as OpenAI lists show one per model


def max_wait(request: Request) -> float:
    settings = settings_of(request)
    return settings.openrouter_max_wait or settings.generation_timeout


def _still_running(task_id: str, waited: float) -> str:
    return (f"still generating after {waited:.0f} s; the task goes on as {task_id}: fetch it with "
            f"POST /query_result {{\"task_id_list\": [\"{task_id}\"]}} on the ACE-Step API")


# A failed task's answer by why it failed: what the request asked for (or what changed under it) is a
# 4xx, so that no chat body a client can send is answered 500; only the server's own failures are.
_FAILURE_STATUS = {
    FailureReason.REJECTED: 422,  # the engine refused the request (e.g. input audio it cannot decode)
    FailureReason.LM_UNAVAILABLE: 503,  # it needs the 5 Hz LM, which no worker loads (as /format_input)
    FailureReason.COST_REFUSED: 413, FailureReason.INPUT_TOO_LARGE: 413,
    FailureReason.MODEL_UNLOADED: 409, FailureReason.ADAPTER_MISSING: 409, FailureReason.INPUT_MISSING: 409,
    FailureReason.CANCELLED: 409,
    FailureReason.STALL_TIMEOUT: 504, FailureReason.GENERATION_TIMEOUT: 504,
}


def _failure(record: TaskRecord | None) -> tuple[int, str]:
    if record is None:
        return 500, "the task is gone (expired)"
    if record.status == CANCELLED:
        return 409, record.error or "cancelled"
    status = _FAILURE_STATUS.get(record.reason, 500) if record.reason is not None else 500
    return status, record.error or "generation failed"


def _parse(body: bytes, settings: Settings, models: list[str]) -> tuple[ChatCompletionRequest, ChatTask]:
    """The body -> the request and its task; every step linear in the body's size. `models`: those served now."""
    try:
        req = ChatCompletionRequest.model_validate(_json_object(body))
    except ValidationError as exc:
        raise bad_request(validation_message(exc, ChatCompletionRequest)) from None
    try:
        return req, to_task(req, model_names=models, default_model=next(iter(models), None),
                            max_audio_bytes=settings.max_upload_bytes)
    except MessageError as exc:
        raise bad_request(str(exc)) from None


@chat_router.post("/v1/chat/completions", summary="Generate music from chat messages",
                  openapi_extra=request_body(model_schema(ChatCompletionRequest), JSON),
                  responses=error_responses(400, 401, 408, 409, 410, 413, 422, 429, 503, 504, 507))
async def chat_completions(request: Request) -> Response:
    settings, backend = settings_of(request), backend_of(request)
    require_key(settings, request)  # the key of the listener it came in on (auth.py)
    body = await read_limited(request, settings.max_upload_bytes * 2 + 1024 * 1024)  # base64 grows by 4/3
    # JSON, validation and base64 off the event loop the other API shares (handlers/off_loop.py)
    models = await run_in_threadpool(served_model_names, settings, backend)  # after a POST /v1/init: the new set
    req, task = await parse_off_loop(len(body), _parse, body, settings, models)
    # /release_task's path and limits: cost ceiling (413), per-caller tasks in flight (429), counted
    # per API key (or address) across both APIs.
    submit = SubmitTask(task.parsed.request, caller_of(request), task.parsed.sources,
                        webhook_url=(req.model_extra or {}).get("webhook_url"),
                        query_as_caption_without_lm=task.guessed_query)
    stream, model_id = req.stream, task.model_id
    # The body, its parsed copy and the decoded audio (~3x the body: 170 MB for a 60 MB one) are not
    # kept through a wait of up to ACESTEP_GENERATION_TIMEOUT: clients waiting at once must not add up.
    del body, req, task
    release_body(request)  # so its bytes no longer count against the body budget either
    submitted = await submitter_of(request).submit(submit)
    del submit
    task_id, lm_fallback = submitted.task_id, submitted.query_as_caption
    headers = {TASK_HEADER: task_id}
    if stream:
        return StreamingResponse(_stream(request, task_id, model_id, lm_fallback),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    started = time.monotonic()
    async for tick in ticks(backend, task_id, max_wait(request), request.app.state.poll_seconds):
        if tick.timed_out:
            raise ApiError(504, _still_running(task_id, time.monotonic() - started), headers=headers)
        if tick.finished:
            return await _completion(request, tick, model_id, lm_fallback, headers)
        if await request.is_disconnected():
            cancel_in_background(backend, task_id, webhooks_of(request).task_finished)
            return Response(status_code=499)  # nobody reads it
    raise AssertionError("ticks() ends with a finished or timed-out tick")  # pragma: no cover


async def _completion(request: Request, tick: Tick, model_id: str, lm_fallback: bool,
                      headers: dict[str, Any]) -> Response:
    record = tick.record
    if record is None or record.status != SUCCEEDED:
        status, detail = _failure(record)
        raise ApiError(status, detail, headers=headers)
    # The 200 goes out before the audio is read: a file that is not there (expired, deleted) or a store that
    # fails is found now, while the answer can still be an error status saying so.
    problem = await run_in_threadpool(responses.audio_problem, record, backend_of(request).blobs)
    if problem is not None:
        retry = {"Retry-After": "5"} if problem.status == responses.STORE_FAILED else {}
        raise ApiError(problem.status, f"{problem.detail} (task {record.task_id})", headers={**headers, **retry})
    # Written as it is encoded (its pieces are made on a thread: blob reads, base64), never whole in memory
    body = responses.completion_parts(responses.completion_id(), model_id, responses.content_text(record, lm_fallback),
                                      record, backend_of(request).blobs)
    return StreamingResponse(body, media_type="application/json", headers=headers)


async def _stream(request: Request, task_id: str, model_id: str, lm_fallback: bool) -> AsyncIterator[str]:
    """Upstream's event sequence: role, "." heartbeats, the text, the audio, finish, [DONE]."""
    backend = backend_of(request)
    out = responses.Chunks(responses.completion_id(), model_id)
    ended = False  # the task finished, or the wait limit was reached: nothing to cancel
    started = last_beat = time.monotonic()
    try:
        yield out.chunk(role="assistant", content="Generating music")
        async for tick in ticks(backend, task_id, max_wait(request), request.app.state.poll_seconds):
            if tick.timed_out:
                ended = True
                yield out.chunk(content="\n\n" + _still_running(task_id, time.monotonic() - started))
                yield out.chunk(finish_reason="error")
                break
            if not tick.finished:
                if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                    last_beat = time.monotonic()
                    yield out.chunk(content=".")
                continue
            ended = True
            record = tick.record
            if record is None or record.status != SUCCEEDED:
                yield out.chunk(content=f"\n\nError: {_failure(record)[1]}")
                yield out.chunk(finish_reason="error")
                break
            yield out.chunk(content="\n\n" + responses.content_text(record, lm_fallback))
            if responses.has_audio(record):
                problem = await run_in_threadpool(responses.audio_problem, record, backend.blobs)
                failed = [problem] if problem is not None else []
                if not failed:  # a file lost during the read ends the audio chunk as a whole line
                    async for piece in iterate_in_threadpool(out.audio_chunk(record, backend.blobs, failed)):
                        yield piece
                if failed:
                    yield out.chunk(content=f"\n\nError: {failed[0].detail}")
                    yield out.chunk(finish_reason="error")
                    break
            yield out.chunk(finish_reason="stop")
        yield out.DONE
    finally:
        if not ended:  # the client went away while the task waited or ran
            cancel_in_background(backend, task_id, webhooks_of(request).task_finished)


@router.get("/v1/models", response_model=None, summary="Models (OpenAI list shape with OpenRouter's fields)")
@router.get("/api/v1/models", response_model=None,
            summary="Models, at the path of upstream's standalone OpenRouter server")
async def list_models(request: Request) -> JSONObject:
    settings = settings_of(request)
    require_key(settings, request)
    listing = await run_in_threadpool(model_list, settings, backend_of(request))
    data = []
    for m in listing["models"]:
        demo = m.get("random_weights")
        data.append({
            "id": MODEL_PREFIX + m["name"], "object": "model", "created": MODELS_CREATED, "owned_by": "acestep",
            "name": f"ACE-Step {m['name']}", "input_modalities": ["text", "audio"],
            "output_modalities": ["audio", "text"], "context_length": 4096, "max_output_length": 600,
            "pricing": {"prompt": "0", "completion": "0", "request": "0", "image": "0"},
            "supported_sampling_parameters": ["temperature", "top_p", "top_k", "seed"],
            "description": "AI music generation model" + (" (random-weight demo: noise)" if demo else ""),
            "is_default": m["is_default"], "random_weights": demo,
        })
    return {"object": "list", "data": data}


@router.get("/health", summary="Health check (no auth)")
async def health(request: Request) -> JSONResponse:
    report = await run_in_threadpool(check_health, backend_of(request), settings_of(request).stall_timeout)
    body = {"status": report.status, "service": "ACE-Step OpenRouter API", "version": "1.0",
            "reasons": report.reasons, "workers_alive": len(report.workers)}
    return JSONResponse(body, status_code=200 if report.serving else 503)
