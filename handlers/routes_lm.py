"""POST /format_input and POST /v1/create_sample (need the 5 Hz LM), POST /create_random_sample (example prompts)."""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from engine.request import GenerationRequest
from engine.types import GenerationError

from service.format_via_worker import format_request, give_up, read_answer, sample_request
from service.submitter import SubmitTask

from .aliases import Canonical, parse_object
from .auth import require_body_or_header, token_from_fields
from .body import read_body
from .caller import caller_of
from .deps import backend_of, settings_of, submitter_of
from .envelope import ApiError, Enveloped, bad_request, wrap
from .fields import to_bool
from .openapi_bodies import (FORM, JSON, RandomSampleInput, create_sample_schema, error_responses, format_input_schema,
                             model_schema, request_body)
from .openapi_responses import CreatedSample, Envelope, FormattedInput, ok
from .request_parsing import validate_canonical
from .task_wait import finally_in_thread, poll

router = APIRouter(tags=["lm"])
EXAMPLES_DIR = Path(__file__).parent / "examples"


def parse_format_input(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate /format_input's body: prompt, lyrics, temperature and param_obj metadata.

    Through /release_task's validation (validate_canonical), so the limits and value forms are the same;
    only where each value is read from is this route's own.
    """
    try:
        obj = parse_object(fields.get("param_obj"), "param_obj") or {}
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    canonical = Canonical()
    for name, source, prefix, aliases in (
            ("prompt", fields, (), ("prompt", "caption")), ("lyrics", fields, (), ("lyrics",)),
            ("lm_temperature", fields, (), ("temperature",)),
            ("time_signature", obj, ("param_obj",), ("time_signature",)),
            ("time_signature", fields, (), ("time_signature",)),
            ("audio_duration", obj, ("param_obj",), ("duration",)), ("bpm", obj, ("param_obj",), ("bpm",)),
            ("key_scale", obj, ("param_obj",), ("key", "key_scale")),
            ("vocal_language", obj, ("param_obj",), ("language", "vocal_language"))):
        alias = next((a for a in aliases if source.get(a) is not None), None)
        if alias is not None and name not in canonical.values:
            canonical.put(name, source[alias], prefix + (alias,))
    if canonical.values.get("vocal_language") in ("", "unknown"):
        canonical.pop("vocal_language")
    req = validate_canonical(canonical)
    given = req.model_fields_set
    metadata = {"duration": req.audio_duration, "bpm": req.bpm, "key_scale": req.key_scale or None,
                "time_signature": req.time_signature or None,
                "language": req.vocal_language if "vocal_language" in given else None}
    return {"caption": req.prompt, "lyrics": req.lyrics,
            "metadata": {k: v for k, v in metadata.items() if v is not None}, "temperature": req.lm_temperature}


@router.post("/format_input", response_model=None, summary="Rewrite caption and lyrics with the 5Hz LM",
             openapi_extra=request_body(format_input_schema(), JSON, FORM, required=False),
             responses={**ok(Envelope[FormattedInput]),
                        **error_responses(400, 401, 413, 429, 503, 504, 507)})
async def format_input(request: Request) -> Enveloped:
    """Returns `{caption, lyrics, bpm, key_scale, time_signature, duration, vocal_language}`, or
    503 when this server has no LM. The LM runs on a worker as a task that counts against the caller's
    limits like any other (429 over them); one that does not answer within ACESTEP_FORMAT_TIMEOUT is
    cancelled (504)."""
    try:
        args, out = await _lm_answer(request, parse_format_input, "format_sample", format_request)
    except GenerationError as exc:
        return wrap(None, code=500, error=f"format_sample failed: {exc}")
    meta = args["metadata"]
    return wrap({
        "caption": out.get("caption") or args["caption"],
        "lyrics": out.get("lyrics") or args["lyrics"],
        "bpm": out.get("bpm", meta.get("bpm")),
        "key_scale": out.get("key_scale", meta.get("key_scale", "")),
        "time_signature": out.get("time_signature", meta.get("time_signature", "")),
        "duration": out.get("duration", meta.get("duration")),
        "vocal_language": out.get("vocal_language") or meta.get("language") or "unknown",
    })


async def _lm_answer(request: Request, parse: Callable[[dict[str, Any]], dict[str, Any]], method: str,
                     as_task: Callable[..., GenerationRequest]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An LM-only route's common path: read and authorize the body, parse it, and run `method` on the LM in
    this process (create_app's lm_gateway) when there is one, else as a task on a worker. (args, answer)."""
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    args = parse(body.fields)
    local = getattr(request.app.state.lm_gateway, method, None)
    if local is not None:
        out = await run_in_threadpool(lambda: local(**args))
    else:
        out = await _answer_on_a_worker(request, as_task(**args), method)
    return args, out or {}


async def _answer_on_a_worker(request: Request, task: GenerationRequest, what: str) -> dict[str, Any]:
    """Submit the format task through /release_task's path (its caller limits, queue bound, cost ceiling:
    429/413/503/507 alike), then wait for it on the event loop; cancel it when the wait ends unanswered."""
    settings, backend = settings_of(request), backend_of(request)
    submitted = await submitter_of(request).submit(SubmitTask(task, caller_of(request), answer_now=True))
    task_id = submitted.task_id
    reason = f"{request.url.path} stopped waiting after at most {settings.format_timeout:g} s (ACESTEP_FORMAT_TIMEOUT)"
    try:
        answer = await poll(lambda: read_answer(backend, task_id), settings.format_timeout,
                            gone=request.is_disconnected)
    except BaseException:  # the server is stopping (or the store failed): nobody will read the answer
        await finally_in_thread(lambda: give_up(backend, task_id, reason))
        raise
    if answer is None:  # timed out, or the caller hung up: cancel it rather than let it run later
        if not await run_in_threadpool(give_up, backend, task_id, reason):
            answer = await run_in_threadpool(read_answer, backend, task_id)  # it finished as we gave up
    if answer is None:
        raise ApiError(504, f"{what} timed out: no worker answered within {settings.format_timeout:g} s "
                            f"(ACESTEP_FORMAT_TIMEOUT); task {task_id} was cancelled")
    return answer


def parse_create_sample(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate /v1/create_sample's body (query, instrumental, vocal_language, temperature) through
    /release_task's validation, so the limits and value forms are the same; vocal_language defaults to
    upstream's "unknown" here (the LM picks the language)."""
    try:
        instrumental = to_bool(fields["instrumental"]) if fields.get("instrumental") is not None else None
    except ValueError as exc:
        raise bad_request(f"instrumental: {exc}") from None
    canonical = Canonical()
    for name, alias in (("sample_query", "query"), ("vocal_language", "vocal_language"),
                        ("lm_temperature", "temperature")):
        canonical.put(name, fields.get(alias), (alias,))
    if not canonical.values.get("vocal_language"):
        canonical.put("vocal_language", "unknown", ("vocal_language",))
    req = validate_canonical(canonical)
    return {"query": req.sample_query, "instrumental": bool(instrumental), "vocal_language": req.vocal_language,
            "temperature": req.lm_temperature}


@router.post("/v1/create_sample", response_model=None, summary="Write a song's caption, lyrics and metadata from a "
             "description with the 5Hz LM", openapi_extra=request_body(create_sample_schema(), JSON, FORM, required=False),
             responses={**ok(Envelope[CreatedSample]), **error_responses(400, 401, 413, 429, 503, 504, 507)})
async def create_sample(request: Request) -> Enveloped:
    """Upstream's: `{caption, lyrics, bpm, keyscale, duration, timesignature, vocal_language}` from `query`
    (LM sample mode, no audio), or 503 when this server has no LM. It runs on a worker like /format_input
    (the caller's limits, ACESTEP_FORMAT_TIMEOUT). `instrumental: true` is told to the LM through the
    description, which is where this server's sample mode reads it from."""
    try:
        args, out = await _lm_answer(request, parse_create_sample, "create_sample", sample_request)
    except GenerationError as exc:
        return wrap(None, code=500, error=f"create_sample failed: {exc}")
    return wrap({"caption": out.get("caption") or "", "lyrics": out.get("lyrics") or "", "bpm": out.get("bpm"),
                 "keyscale": out.get("key_scale") or "", "duration": out.get("duration"),
                 "timesignature": out.get("time_signature") or "",
                 "vocal_language": out.get("vocal_language") or args["vocal_language"]})


@lru_cache(maxsize=None)
def examples(kind: str) -> tuple[dict[str, Any], ...]:
    path = EXAMPLES_DIR / f"{kind}.json"
    with open(path, encoding="utf-8") as f:
        return tuple(json.load(f))


@router.post("/create_random_sample", response_model=None, summary="A random example request (no LM)",
             openapi_extra=request_body(model_schema(RandomSampleInput), JSON, FORM, required=False),
             responses={**ok(Envelope[dict[str, Any]]), **error_responses(400, 401)})
async def create_random_sample(request: Request) -> Enveloped:
    """`simple_mode` (default): `{description, instrumental, vocal_language}`; any other
    sample_type: `{think, caption, lyrics, bpm, duration, keyscale, language, timesignature}`.
    Either can be sent straight to /release_task."""
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    try:
        sample_type = RandomSampleInput.model_validate(body.fields).sample_type or "simple_mode"
    except ValidationError:
        raise bad_request("sample_type: must be a string such as 'simple_mode' or 'custom_mode'") from None
    kind = "simple_mode" if sample_type.strip() == "simple_mode" else "text2music"
    return wrap(dict(random.choice(examples(kind))))
