"""POST /v1/tasks/{task_id}/cancel and its upstream-style twin POST /cancel_task {task_id}."""
from __future__ import annotations

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.cancellation import cancel_task

from .auth import require_body_or_header, token_from_fields
from .body import read_body
from .deps import backend_of, settings_of, webhooks_of
from .envelope import Enveloped, bad_request, not_found, wrap
from .openapi_bodies import FORM, JSON, CancelTaskInput, error_responses, model_schema, request_body
from .openapi_responses import CancelOutcome, Envelope, ok
from .results import MAX_ID_LEN

router = APIRouter(tags=["tasks"])


async def _cancel(request: Request, task_id: object) -> Enveloped:
    try:
        valid = CancelTaskInput.model_validate({"task_id": task_id}).task_id
    except ValidationError:
        raise bad_request(f"task_id: a task id of 1-{MAX_ID_LEN} characters is required") from None
    outcome = await run_in_threadpool(cancel_task, backend_of(request), valid.strip(),
                                      on_cancelled=webhooks_of(request).task_finished)
    record = outcome.record
    if record is None:
        raise not_found("task not found")
    # A task that finished first keeps its outcome: the answer says which (no error: a client racing
    # its own task's end needs no special case).
    return wrap({"task_id": record.task_id, "status": record.status, "cancelled_now": outcome.cancelled_now})


_DOC = """Stop a task: a queued one never runs; a running one stops at its next diffusion step
and frees the GPU. Its status becomes "cancelled" (/query_result: status 2, error "cancelled by the
client"). 404 for an unknown task. A task that finished first is left as it is: `status` says
how it ended and `cancelled_now` is false (also when it was cancelled before)."""


_TASK_ID = model_schema(CancelTaskInput)["properties"]["task_id"]


@router.post("/v1/tasks/{task_id}/cancel", response_model=None, summary="Cancel a task", description=_DOC,
             responses={**ok(Envelope[CancelOutcome]), **error_responses(400, 401, 404)})
async def cancel(request: Request, task_id: str = Path(json_schema_extra=_TASK_ID)) -> Enveloped:
    body = await read_body(request, settings_of(request), empty_ok=True)
    require_body_or_header(settings_of(request), request, token_from_fields(body.fields))
    return await _cancel(request, task_id)


@router.post("/cancel_task", response_model=None, summary="Cancel a task (body: task_id)", description=_DOC,
             openapi_extra=request_body(model_schema(CancelTaskInput), JSON, FORM),
             responses={**ok(Envelope[CancelOutcome]), **error_responses(400, 401, 404)})
async def cancel_by_body(request: Request) -> Enveloped:
    body = await read_body(request, settings_of(request), empty_ok=True)
    require_body_or_header(settings_of(request), request, token_from_fields(body.fields))
    return await _cancel(request, body.fields.get("task_id"))
