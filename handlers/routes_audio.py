"""GET /v1/audio (result files) and the direct-upload flow (POST /v1/uploads, PUT /v1/uploads/<key>).

/v1/audio serves only outputs of SUCCEEDED tasks, by opaque key (`outputs/<task_id>/<i>.<fmt>`),
to callers with the API key or a valid signed URL. Embedded: the file (Range supported);
AWS: a 307 to a presigned S3 URL.
"""
from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from engine.types import CONTENT_TYPES
from service import blob_keys, upload_quota
from service.records import SUCCEEDED

from .auth import header_is_valid, require_body_or_header, require_header, token_from_fields
from .body import read_body, read_limited, upload_limit
from .caller import caller_of
from .deps import backend_of, settings_of
from .envelope import ApiError, Enveloped, bad_request, forbidden, not_found, wrap
from .fields import shown
from .openapi_bodies import FORM, JSON, UploadInput, error_responses, model_schema, request_body
from .openapi_responses import Envelope, UploadTicket, ok
from service.signed_urls import upload_url, url_keys, verify

router = APIRouter(tags=["audio"])

ACCESS_DENIED = "Access denied: path outside allowed directory"
AUDIO_NOT_FOUND = "Audio file not found"
UPLOAD_TTL = 900
UPLOAD_ROLES = ("src_audio", "reference_audio")


def over_quota(quota: int) -> ApiError:
    """429 for a PUT that would take the caller's unused direct uploads past upload_quota.quota_bytes."""
    return ApiError(429, f"your direct uploads not yet used already hold up to {quota // 2**20} MB "
                         f"({upload_quota.QUOTA_UPLOADS} x ACESTEP_MAX_UPLOAD_MB + ACESTEP_MAX_ADAPTER_MB): use them, "
                         f"or wait until unused ones expire ({upload_quota.PENDING_UPLOAD_SECONDS // 60} minutes after "
                         "their upload)", headers={"Retry-After": "60"})


def _missing_path() -> ApiError:
    return ApiError(422, [{"loc": ["query", "path"], "msg": "Field required", "type": "missing"}])  # type: ignore[arg-type]


# `path` is required, but checked after the key (a caller without the key learns nothing): the
# handler reads it as optional and the schema documents it as required.
_PATH_PARAM = {"name": "path", "in": "query", "required": True, "description": "the `file` value's key",
               "schema": {"type": "string", "minLength": 1}}


@router.get("/v1/audio", summary="Download a generated audio file", openapi_extra={"parameters": [_PATH_PARAM]},
            responses={200: {"content": {t: {} for t in dict.fromkeys(CONTENT_TYPES.values())}},
                       307: {"description": "AWS: a presigned S3 URL"}, **error_responses(401, 403, 404, 422)})
async def get_audio(request: Request, path: Optional[str] = Query(None, include_in_schema=False),
                    expires: Optional[str] = None, sig: Optional[str] = None) -> Response:
    """Use the `file` URL from /query_result as is: it is signed, so it works without headers
    until it expires; with the API key in the Authorization header, any result key works."""
    settings, backend = settings_of(request), backend_of(request)
    if settings.api_key and not header_is_valid(settings, request):
        if not (path and verify(url_keys(backend), "audio", path, expires, sig)):
            if not request.headers.get("authorization") and (sig or expires):
                raise ApiError(401, "Invalid or expired audio URL signature")
            require_header(settings, request)
    if not path:
        raise _missing_path()
    output = blob_keys.parse_output_key(path)
    if output is None:
        if blob_keys.is_within_storage(path):
            raise not_found(AUDIO_NOT_FOUND)
        raise forbidden(ACCESS_DENIED)
    task_id, fmt = output.task_id, output.format

    # What the store has: a local file's path, a presigned URL, or the bytes themselves.
    def lookup() -> tuple[Literal["file", "url"], str] | tuple[Literal["bytes"], bytes]:
        record = backend.store.get(task_id)
        if record is None or record.status != SUCCEEDED or path not in (record.blob_keys or []):
            raise not_found(AUDIO_NOT_FOUND)
        local = backend.blobs.local_path(path)
        if local:
            return ("file", local)
        url = backend.blobs.presigned_get_url(path, int(settings.audio_url_ttl))
        if url:
            return ("url", url)
        try:
            return ("bytes", backend.blobs.get(path))
        except KeyError:
            raise not_found(AUDIO_NOT_FOUND) from None

    found = await run_in_threadpool(lookup)
    media = CONTENT_TYPES[fmt]
    if found[0] == "url":
        return RedirectResponse(found[1], status_code=307)
    filename = f"{task_id}_{output.filename}"
    headers = {"Cache-Control": "private, max-age=3600"}
    if found[0] == "file":
        return FileResponse(found[1], media_type=media, filename=filename, content_disposition_type="inline",
                            headers=headers)
    return Response(found[1], media_type=media, headers={**headers, "Accept-Ranges": "none",
                                                      "Content-Disposition": f'inline; filename="{filename}"'})


router.add_api_route("/v1/audio", get_audio, methods=["HEAD"], include_in_schema=False)


# --- direct uploads --------------------------------------------------------------------------------

@router.post("/v1/uploads", response_model=None, summary="Get a URL to upload source/reference audio",
             openapi_extra=request_body(model_schema(UploadInput), JSON, FORM),
             responses={**ok(Envelope[UploadTicket]), **error_responses(400, 401, 415)})
async def create_upload(request: Request) -> Enveloped:
    """Returns `{key, upload_url, method: "PUT", expires_in, headers, max_bytes}`. PUT the file
    to `upload_url` (relative URLs are on this API), then send `src_audio_key` (or
    `reference_audio_key`) = `key` to /release_task. For bodies too big for a request (Lambda)."""
    settings, backend = settings_of(request), backend_of(request)
    body = await read_body(request, settings)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    fields = {k: v for k, v in body.fields.items() if v not in (None, "")}  # absent, as before
    try:
        upload = UploadInput.model_validate(fields)
    except ValidationError as exc:
        where = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        if where & {"content_type", "contentType"}:
            given = fields.get("content_type", fields.get("contentType"))
            raise ApiError(415, f"content_type: must be an audio type such as audio/mpeg or audio/wav "
                                f"(got {str(given)[:100]!r})") from None
        if "role" in where:
            raise bad_request(f"role: must be one of {', '.join(UPLOAD_ROLES)} (got {shown(fields.get('role'))})") from None
        raise bad_request("filename: required, 1-255 characters (the name of the audio file, e.g. song.mp3)") from None
    filename, role = upload.filename, upload.role
    content_type = upload.content_type or "application/octet-stream"
    key = blob_keys.new_pending_upload_key(filename, caller_of(request).id)
    presign = getattr(backend.blobs, "presigned_put_url", None)
    url = None
    if callable(presign):
        url = await run_in_threadpool(presign, key, content_type, UPLOAD_TTL)
    if not url:
        url = upload_url(url_keys(backend), key, UPLOAD_TTL)
    return wrap({"key": key, "upload_url": url, "method": "PUT", "expires_in": UPLOAD_TTL,
                 "headers": {"Content-Type": content_type}, "max_bytes": upload_limit(settings),
                 "role": role, "field": f"{role or 'src_audio'}_key"})


@router.put("/v1/uploads/{key:path}", response_model=None,
            summary="Upload a file to a signed upload URL (embedded backend)",
            openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}},
            responses=error_responses(400, 401, 403, 408, 413, 507))
async def put_upload(request: Request, key: str, expires: Optional[str] = None, sig: Optional[str] = None) -> Enveloped:
    settings, backend = settings_of(request), backend_of(request)
    if not verify(url_keys(backend), "upload", key, expires, sig):
        if not (settings.api_key and header_is_valid(settings, request)):
            raise forbidden("Invalid or expired upload URL")
    if not blob_keys.is_pending_upload_key(key):
        raise forbidden("Not an upload key")
    limit = upload_limit(settings)
    quota = upload_quota.quota_bytes(settings)
    if await run_in_threadpool(upload_quota.pending_bytes, backend.blobs, key) >= quota:  # before reading it
        raise over_quota(quota)
    data = await read_limited(request, limit, "Upload")
    if not data:
        raise bad_request("The upload is empty")
    if await run_in_threadpool(upload_quota.pending_bytes, backend.blobs, key) + len(data) > quota:
        raise over_quota(quota)
    content_type = request.headers.get("content-type", "application/octet-stream")[:100]
    await run_in_threadpool(backend.blobs.put, key, data, content_type)
    return wrap({"key": key, "size": len(data)})
