"""POST /release_task (submit a generation) and POST /query_result (poll tasks)."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from .adapter_fields import with_adapters
from .auth import require_body_or_header, token_from_fields
from .body import read_body
from .off_loop import parse_off_loop
from service.fleet import served_model_names
from service.submitter import SubmitTask

from .caller import caller_of
from .deps import backend_of, settings_of, submitter_of
from .envelope import Enveloped, bad_request, wrap
from .fields import text_list
from .request_parsing import parse_release_task
from .openapi_bodies import (FORM, JSON, MAX_IDEMPOTENCY_KEY, QueryResultInput, error_responses, model_schema,
                             release_task_body, request_body)
from .openapi_responses import Envelope, QueryEntry, SubmittedTask, ok
from .results import MAX_IDS, QueryResults, envelope_bytes

router = APIRouter(tags=["tasks"])

IDEMPOTENCY_HEADER = "Idempotency-Key"


_RELEASE_DOC = """Create a music generation task.

Accepts JSON, multipart/form-data (files `src_audio`/`ctx_audio`, `reference_audio`/`ref_audio`),
x-www-form-urlencoded or a raw JSON / `key=value` body. Every upstream field and alias is
accepted, also inside `param_obj` and `metas`/`metadata`. Invalid values are a 400 naming the
field and its allowed range. Returns `{task_id, status: "queued", queue_position}`.

With an `Idempotency-Key` header (or body field `idempotency_key`), a retried submit returns the
first task instead of creating another; reusing a key for a different request is a 422.

With `webhook_url`, the task's final /query_result entry is POSTed there once it succeeds, fails
or is cancelled, signed in the Standard Webhooks scheme (`webhook-id`, `webhook-timestamp`,
`webhook-signature`) with the server's webhook secret (GET /v1/webhook_secret), never the API key;
private and loopback hosts are refused unless ACESTEP_WEBHOOK_ALLOW_PRIVATE.
"""

def read_idempotency_key(header: Optional[str], fields: dict[str, Any]) -> Optional[str]:
    """The `Idempotency-Key` header, else body field `idempotency_key`; None when neither is sent."""
    name, value = IDEMPOTENCY_HEADER, header
    if header is None:
        name, value = "idempotency_key", fields.get("idempotency_key")
    if value is None:
        return None
    # Printable ASCII only: the key is stored and compared as is, and echoed in error messages.
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY \
            or not all(" " <= c <= "~" for c in value):
        raise bad_request(f"{name}: must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return value


_IDEMPOTENCY_PARAM = {"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                      "schema": {"type": "string", "pattern": f"^[ -~]{{1,{MAX_IDEMPOTENCY_KEY}}}$"},
                      "description": "retry-safe submit: a retry with the same key returns the first task"}


@router.post("/release_task", response_model=None, summary="Create a generation task", description=_RELEASE_DOC,
             openapi_extra={"parameters": [_IDEMPOTENCY_PARAM], **release_task_body()},
             responses={**ok(Envelope[SubmittedTask]), **error_responses(400, 401, 413, 415, 422, 429, 503, 507)})
async def release_task(request: Request) -> Enveloped:
    settings = settings_of(request)
    body = await read_body(request, settings, files_allowed=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    idempotency_key = read_idempotency_key(request.headers.get(IDEMPOTENCY_HEADER), body.fields)
    try:
        fields = with_adapters(body.fields)  # `adapter` / `adapter_scale` -> the canonical `adapters`
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    parsed = await parse_off_loop(body.size, parse_release_task, fields, body.files,
                                  model_names=await run_in_threadpool(served_model_names, settings,
                                                                      backend_of(request)))
    task = await submitter_of(request).submit(SubmitTask(
        parsed.request, caller_of(request), parsed.sources, idempotency_key=idempotency_key,
        webhook_url=body.fields.get("webhook_url")))
    return wrap({"task_id": task.task_id, "status": "queued", "queue_position": task.queue_position})


def parse_task_ids(value: Any) -> list[str]:
    """A list, a JSON string of one (what a form sends), or a comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = text_list(value)
        except ValueError:
            raise bad_request("task_id_list: must be a list of task ids or a JSON string of one") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request("task_id_list: must be a list of task ids (strings)")
    if len(value) > MAX_IDS:
        raise bad_request(f"task_id_list: at most {MAX_IDS} ids per query (got {len(value)})")
    return [v.strip() for v in value]


@router.post("/query_result", summary="Poll tasks",
             openapi_extra=request_body(model_schema(QueryResultInput), JSON, FORM, required=False),
             responses={**ok(Envelope[list[QueryEntry]]), **error_responses(400, 401)})
async def query_result(request: Request) -> Response:
    """One entry per id, in order: `{task_id, status: 0 running/queued | 1 succeeded | 2 failed,
    result: JSON string, progress_text}`."""
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    try:
        raw = QueryResultInput.model_validate(body.fields).task_id_list
    except ValidationError:
        raise bad_request("task_id_list: must be a list of task ids or a JSON string of one") from None
    ids = parse_task_ids(raw)
    results: QueryResults = request.app.state.query_results
    # Finished tasks are served from memory on the event loop; anything else reads the store in a thread.
    entries = results.cached(ids)
    if entries is None:
        entries = await run_in_threadpool(results.entries, ids)
    # Pre-serialised entries: a plain Response skips FastAPI's encoder.
    return Response(envelope_bytes(entries), media_type="application/json")
