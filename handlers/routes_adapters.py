"""LoRA/LoKr adapters: GET/POST /v1/adapters (list, upload) and upstream's /v1/lora/* (the server's default).

Uploading, for any size up to ACESTEP_MAX_ADAPTER_MB:
    POST /v1/adapters/uploads {filename}      -> {key, upload_url, ...}; PUT the file to upload_url (S3 on AWS)
    POST /v1/adapters {key, name?, model?}    -> checked (400 if it does not fit the model), stored by sha256
or in one request: POST /v1/adapters with the file as the body (application/octet-stream; name, model as query
parameters) or as the multipart part `file` (up to ACESTEP_MAX_UPLOAD_MB). On AWS Lambda a body carries at most 6 MB (the
function's payload limit, and the whole body sits in its memory): a bigger file is a 413 that says to use the
upload URL, whose PUT goes straight to S3.

/v1/lora/load|unload|toggle|scale|status answer in upstream's shapes, with this server's meaning: they set the
default adapters of the whole fleet (what a request without an `adapter` field gets), not one process's state.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional
from urllib.parse import quote

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from engine.request import ADAPTER_NAME_RE, ADAPTER_SCALE_MAX, ADAPTER_SCALE_MIN
from service import blob_keys, upload_quota
from service.adapter_catalog import AdapterEntry
from service.adapter_defaults import status_payload
from service.adapter_services import AdapterServices
from service.adapter_uploads import AdapterUpload
from service.observability.health import alive_only
from service.refusals import AdapterRejected, AdapterTooLarge
from service.signed_urls import signature, url_keys, verify

from .auth import header_is_valid, require_body_or_header, require_header, token_from_fields
from .body import read_body, read_limited, media_type
from .caller import caller_of
from .deps import backend_of, settings_of, submitter_of
from .envelope import ApiError, Enveloped, bad_request, forbidden, wrap
from .openapi_bodies import FORM, JSON, MULTIPART, error_responses, model_schema, request_body
from .openapi_responses import Envelope, PresignedPut, ok
from .routes_audio import over_quota

router = APIRouter(tags=["adapters"])

UPLOAD_TTL = 900
# On AWS Lambda (Mangum puts the event in the scope) a request body passes whole through the function's memory
# and its 6 MB payload limit: a bigger adapter goes by POST /v1/adapters/uploads and a PUT to S3 instead.
LAMBDA_DIRECT_BYTES = 6 * 1024 * 1024
UPLOAD_PURPOSE = "adapter-upload"  # its own signature: an audio upload URL cannot carry an adapter's size
OCTET = "application/octet-stream"


# Refusals of schema-valid requests: they depend on what is stored (tests/test_openapi_conformance.py reads these).
STATE_RULES: dict[str, dict[int, tuple[str, ...]]] = {
    "/v1/adapters": {400: ("key:", "not a valid adapter", "adapter name", "model", "empty", ".zip"),
                     409: ("name",)},
    "/v1/adapters/{name}": {404: ("no uploaded adapter",), 409: ("ACESTEP_LORA_DIR", "default", "task")},
    "/v1/lora/load": {400: ("adapter",)},
    "/v1/lora/toggle": {400: ("no adapter loaded",)},
    "/v1/lora/scale": {400: ("no adapter loaded", "is not loaded")},
}


def adapters_of(request: Request) -> AdapterServices:
    return submitter_of(request).adapters


def _conflict_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    out = error_responses(*[c for c in codes if c != 409])
    if 409 in codes:
        out[409] = {"description": "The name is taken, or the change is not possible on this server",
                    "content": {JSON: {"schema": {"type": "object", "properties": {"detail": {}},
                                                  "required": ["detail"]}}}}
    return out


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', '')}" if where else str(err.get("msg", "")))
        raise bad_request("; ".join(parts)) from None


# --- documented shapes ------------------------------------------------------------------------------------

class AdapterListing(BaseModel):
    name: str
    type: str  # lora | lokr
    format: str
    rank: int
    alpha: float
    size_bytes: int
    target_modules: list[str]
    num_layers: int
    source: Literal["uploaded", "lora_dir", "worker_lora_dir"]
    where: str
    sha256: Optional[str]
    model: Optional[str]
    fits_models: list[str]
    uploaded_at: Optional[float]


class AdapterList(BaseModel):
    adapters: list[AdapterListing]
    lora_dir: str
    unusable: dict[str, str]  # files under ACESTEP_LORA_DIR that are not adapters, and why
    default: dict[str, Any]  # GET /v1/lora/status
    max_bytes: int


class AdapterStored(BaseModel):
    adapter: AdapterListing
    created: bool


class AdapterUploadTicket(PresignedPut):
    then: str


class AdapterUploadRequest(BaseModel):
    """POST /v1/adapters/uploads."""
    model_config = ConfigDict(extra="ignore")

    filename: str = Field(min_length=1, max_length=255, pattern=r"\S")
    ai_token: Optional[str] = None


class RegisterAdapter(BaseModel):
    """POST /v1/adapters (JSON or form): a finished upload's key."""
    model_config = ConfigDict(extra="ignore")

    key: str = Field(min_length=1, max_length=300, description="the key POST /v1/adapters/uploads gave")
    name: Optional[str] = Field(None, pattern=ADAPTER_NAME_RE, description="default: the file's name")
    model: Optional[str] = Field(None, min_length=1, max_length=200, description="default: the default model")
    replace: bool = False
    ai_token: Optional[str] = None


class LoadLoRA(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_path: str = Field(min_length=1, max_length=1024,
                           description="an adapter's name (GET /v1/adapters), or a path under ACESTEP_LORA_DIR")
    adapter_name: Optional[str] = Field(None, max_length=128,
                                        description="stack it under this name (upstream's multi-adapter mode)")
    ai_token: Optional[str] = None


class ToggleLoRA(BaseModel):
    model_config = ConfigDict(extra="ignore")

    use_lora: bool
    ai_token: Optional[str] = None


class ScaleLoRA(BaseModel):
    model_config = ConfigDict(extra="ignore")

    scale: float = Field(ge=ADAPTER_SCALE_MIN, le=ADAPTER_SCALE_MAX)
    adapter_name: Optional[str] = Field(None, max_length=128)
    ai_token: Optional[str] = None


class LoRAMessage(BaseModel):
    message: str
    lora_path: Optional[str] = None
    adapter_name: Optional[str] = None
    use_lora: Optional[bool] = None
    scale: Optional[float] = None


def listing(entry: AdapterEntry, services: AdapterServices) -> dict[str, Any]:
    return {"name": entry.name, "type": entry.kind, "format": entry.format, "rank": entry.rank, "alpha": entry.alpha,
            "size_bytes": entry.size_bytes, "target_modules": entry.target_modules, "num_layers": entry.num_layers,
            "source": entry.source, "where": entry.where, "sha256": entry.sha256, "model": entry.model,
            "fits_models": services.catalog.models_fitting(entry), "uploaded_at": entry.uploaded_at}


def _model_initialized(request: Request) -> bool:
    """Whether some live worker has its models loaded (upstream: the handler's model is in memory)."""
    beats = backend_of(request).store.heartbeats()
    return any(b.state != "failed" for b in alive_only(beats, time.time()))


def _status(request: Request, services: AdapterServices, fresh: bool = False) -> dict[str, Any]:
    return status_payload(services.defaults.current(fresh=fresh), model_initialized=_model_initialized(request))


# --- the catalog ------------------------------------------------------------------------------------------

@router.get("/v1/adapters", response_model=None, summary="LoRA/LoKr adapters this server can apply",
            responses={**ok(Envelope[AdapterList]), **error_responses(401)})
async def list_adapters(request: Request) -> Enveloped:
    """Uploaded ones (blob store), the ones under ACESTEP_LORA_DIR, and the server's default (/v1/lora/status).
    `fits_models`: the served models whose geometry the adapter matches."""
    settings = settings_of(request)
    require_header(settings, request)
    services = adapters_of(request)

    def build() -> dict[str, Any]:
        entries, unusable = services.catalog.listing()
        return {"adapters": [listing(e, services) for e in entries], "lora_dir": str(services.catalog.lora_dir),
                "unusable": unusable, "default": _status(request, services), "max_bytes": settings.max_adapter_bytes}

    return wrap(await run_in_threadpool(build))


@router.post("/v1/adapters/uploads", response_model=None, summary="Get a URL to upload an adapter file",
             openapi_extra=request_body(model_schema(AdapterUploadRequest), JSON, FORM),
             responses={**ok(Envelope[AdapterUploadTicket]), **error_responses(400, 401)})
async def create_adapter_upload(request: Request) -> Enveloped:
    """PUT the file (`.safetensors`, or a `.zip` of a PEFT folder) to `upload_url`, then POST /v1/adapters
    with `key`. For files too big for one request (Lambda takes 6 MB)."""
    settings, backend = settings_of(request), backend_of(request)
    body = await read_body(request, settings)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    ticket = _validated(AdapterUploadRequest, {k: v for k, v in body.fields.items() if v not in (None, "")})
    key = blob_keys.new_pending_upload_key(ticket.filename, caller_of(request).id)  # counted in its quota
    url = await run_in_threadpool(backend.blobs.presigned_put_url, key, OCTET, UPLOAD_TTL)
    if not url:
        expires = int(time.time()) + UPLOAD_TTL
        url = (f"/v1/adapters/uploads/{quote(key, safe='/')}?expires={expires}"
               f"&sig={signature(url_keys(backend), UPLOAD_PURPOSE, key, expires)}")
    return wrap({"key": key, "upload_url": url, "method": "PUT", "expires_in": UPLOAD_TTL,
                 "headers": {"Content-Type": OCTET}, "max_bytes": settings.max_adapter_bytes,
                 "then": "POST /v1/adapters with {\"key\": key}"})


@router.put("/v1/adapters/uploads/{key:path}", response_model=None,
            summary="Upload an adapter file to its signed URL (embedded)",
            openapi_extra={"requestBody": {"required": True, "content": {OCTET: {
                "schema": {"type": "string", "format": "binary"}}}}},
            responses=error_responses(400, 401, 403, 408, 413, 507))
async def put_adapter_upload(request: Request, key: str, expires: Optional[str] = None,
                             sig: Optional[str] = None) -> Enveloped:
    settings, backend = settings_of(request), backend_of(request)
    if not verify(url_keys(backend), UPLOAD_PURPOSE, key, expires, sig):
        if not (settings.api_key and header_is_valid(settings, request)):
            raise forbidden("Invalid or expired upload URL")
    if not blob_keys.is_pending_upload_key(key):
        raise forbidden("Not an upload key")
    quota = upload_quota.quota_bytes(settings)  # the caller's unused uploads, audio ones too (upload_quota.py)
    if await run_in_threadpool(upload_quota.pending_bytes, backend.blobs, key) >= quota:
        raise over_quota(quota)
    data = await read_limited(request, settings.max_adapter_bytes, "Adapter")
    if not data:
        raise bad_request("The upload is empty")
    if await run_in_threadpool(upload_quota.pending_bytes, backend.blobs, key) + len(data) > quota:
        raise over_quota(quota)
    await run_in_threadpool(backend.blobs.put, key, data, OCTET)
    return wrap({"key": key, "size": len(data)})


def _direct_limit(request: Request) -> Optional[int]:
    """The largest adapter this API takes as a request body (None: ACESTEP_MAX_ADAPTER_MB only)."""
    return LAMBDA_DIRECT_BYTES if "aws.event" in request.scope else None


def _use_the_upload_url(limit: int) -> ApiError:
    return ApiError(413, f"Adapter too large to send as the request body here (AWS Lambda takes at most "
                         f"{limit // 2**20} MB): POST /v1/adapters/uploads with {{\"filename\": ...}}, PUT the file "
                         "to its upload_url, then POST /v1/adapters with {\"key\": key}")


def _check_declared(request: Request, limit: Optional[int]) -> None:
    declared = request.headers.get("content-length", "")
    if limit is not None and declared.isdigit() and int(declared) > limit:
        raise _use_the_upload_url(limit)


def _register_upload(services: AdapterServices, request: Request, form: RegisterAdapter) -> tuple[AdapterEntry, bool]:
    settings, blobs = settings_of(request), backend_of(request).blobs
    if not blob_keys.is_pending_upload_key(form.key):
        raise AdapterRejected("key: not an upload key from POST /v1/adapters/uploads")
    size = blobs.size(form.key)
    if size is None:
        raise AdapterRejected("key: nothing was uploaded under this key (or the upload expired)")
    if size > settings.max_adapter_bytes:
        blobs.delete(form.key)
        raise AdapterTooLarge(f"the adapter is {size} bytes; the limit is {settings.max_adapter_mb} MB "
                              "(ACESTEP_MAX_ADAPTER_MB)")
    try:
        data = blobs.get(form.key)
    except KeyError:
        raise AdapterRejected("key: nothing was uploaded under this key (or the upload expired)") from None
    filename = form.key.rsplit("/", 1)[-1]
    stored = services.uploads.register(AdapterUpload(data, filename, form.name, form.model, form.replace))
    blobs.delete(form.key)  # kept under its sha256 now
    return stored


_REGISTER_SCHEMA = model_schema(RegisterAdapter)
_REGISTER_BODY = request_body(_REGISTER_SCHEMA, JSON, FORM)
_REGISTER_BODY["requestBody"]["content"][OCTET] = {"schema": {"type": "string", "format": "binary"}}
_REGISTER_BODY["requestBody"]["content"][MULTIPART] = {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}, "name": {"type": "string", "pattern": ADAPTER_NAME_RE},
                   "model": {"type": "string"}, "replace": {"type": "boolean"}, "ai_token": {"type": "string"}}}}
_QUERY = [{"name": n, "in": "query", "required": False, "schema": s, "description": d} for n, s, d in (
    ("name", {"type": "string", "pattern": ADAPTER_NAME_RE}, "with a file body: the adapter's name"),
    ("model", {"type": "string"}, "with a file body: the model it is for (default: the default model)"),
    ("filename", {"type": "string"}, "with a file body: its file name (.safetensors or .zip)"),
    ("replace", {"type": "boolean"}, "take over the name from another uploaded adapter"))]


@router.post("/v1/adapters", response_model=None,
             summary="Add an uploaded adapter (checked against the model it names)",
             openapi_extra={**_REGISTER_BODY, "parameters": _QUERY},
             responses={**ok(Envelope[AdapterStored]), **_conflict_responses(400, 401, 408, 409, 413, 415, 507)})
async def add_adapter(request: Request) -> Enveloped:
    """A PEFT LoRA/LoKr (`.zip` of the folder upstream's trainer writes) or a single `.safetensors` (PEFT or
    LyCORIS LoKr keys). Every key must name a module of the model and every tensor shape must fit it: else a
    400 that says which. Stored once per content (sha256); the same file under the same name again is a no-op."""
    settings = settings_of(request)
    services = adapters_of(request)
    params = request.query_params
    direct = _direct_limit(request)
    if media_type(request) == OCTET:
        require_header(settings, request)
        _check_declared(request, direct)
        data = await read_limited(request, settings.max_adapter_bytes, "Adapter")
        if direct is not None and len(data) > direct:
            raise _use_the_upload_url(direct)
        upload = AdapterUpload(data, params.get("filename") or "", params.get("name") or None,
                               params.get("model") or None, (params.get("replace") or "").lower() in ("1", "true"))
        entry, created = await run_in_threadpool(services.uploads.register, upload)
    else:
        _check_declared(request, direct)
        body = await read_body(request, settings, files_allowed=True)
        require_body_or_header(settings, request, token_from_fields(body.fields))
        fields = {k: v for k, v in body.fields.items() if v not in (None, "")}
        part = body.files.get("file")
        if part is not None and direct is not None and len(part.data) > direct:
            raise _use_the_upload_url(direct)
        if part is not None:
            form = _validated(RegisterAdapter, {**fields, "key": "-"})
            upload = AdapterUpload(part.data, part.filename or "", form.name, form.model, form.replace)
            entry, created = await run_in_threadpool(services.uploads.register, upload)
        else:
            form = _validated(RegisterAdapter, fields)
            entry, created = await run_in_threadpool(_register_upload, services, request, form)
    return wrap({"adapter": listing(entry, services), "created": created})


class AdapterDeleted(BaseModel):
    name: str
    deleted: bool


@router.delete("/v1/adapters/{name}", response_model=None, summary="Delete an uploaded adapter",
               responses={**ok(Envelope[AdapterDeleted]), **_conflict_responses(401, 404, 409)})
async def delete_adapter(request: Request, name: str) -> Enveloped:
    """Removes an uploaded adapter from the list; its stored file goes too unless another name has the same
    bytes. 404: no uploaded adapter has that name. 409 (saying which): an adapter under ACESTEP_LORA_DIR (the
    operator's files), the fleet's default (/v1/lora/unload first), or one that queued/running tasks use."""
    require_header(settings_of(request), request)
    await run_in_threadpool(adapters_of(request).removal.remove, name)
    return wrap({"name": name, "deleted": True})


# --- upstream's /v1/lora/*: the fleet's default -----------------------------------------------------------

async def _form(request: Request, model: type[BaseModel]) -> Any:
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    return _validated(model, {k: v for k, v in body.fields.items() if v is not None})


_LORA_DOC = ("Sets the default adapters of the whole fleet: what every request without an `adapter` field "
             "gets from now on (stored in the task store; requests already queued keep theirs).")


@router.post("/v1/lora/load", response_model=None,
             summary="Make an adapter the default (upstream's load)", description=_LORA_DOC,
             openapi_extra=request_body(model_schema(LoadLoRA), JSON, FORM),
             responses={**ok(Envelope[LoRAMessage]), **error_responses(400, 401)})
async def lora_load(request: Request) -> Enveloped:
    form: LoadLoRA = await _form(request, LoadLoRA)
    services = adapters_of(request)
    label = form.adapter_name.strip() if form.adapter_name else None
    _, entry = await run_in_threadpool(services.defaults.load, form.lora_path, label)
    out: dict[str, Any] = {"message": f"{entry.kind} adapter {entry.name!r} is the default for requests that name "
                                      "no adapter" + (" (stacked)" if label else ""),
                           "lora_path": form.lora_path}
    if label:
        out["adapter_name"] = label
    return wrap(out)


@router.post("/v1/lora/unload", response_model=None,
             summary="Clear the default adapters (upstream's unload)", description=_LORA_DOC,
             openapi_extra=request_body({"type": "object", "properties": {"ai_token": {"type": "string"}}},
                                        JSON, FORM, required=False),
             responses={**ok(Envelope[LoRAMessage]), **error_responses(400, 401)})
async def lora_unload(request: Request) -> Enveloped:
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    _, was_loaded = await run_in_threadpool(adapters_of(request).defaults.unload)
    return wrap({"message": "default adapters cleared: requests without an adapter field run without one"
                 if was_loaded else "no default adapter was loaded"})


@router.post("/v1/lora/toggle", response_model=None, summary="Apply or pause the default adapters (upstream's toggle)",
             description=_LORA_DOC, openapi_extra=request_body(model_schema(ToggleLoRA), JSON, FORM),
             responses={**ok(Envelope[LoRAMessage]), **error_responses(400, 401)})
async def lora_toggle(request: Request) -> Enveloped:
    form: ToggleLoRA = await _form(request, ToggleLoRA)
    await run_in_threadpool(adapters_of(request).defaults.toggle, form.use_lora)
    return wrap({"message": "default adapters " + ("applied" if form.use_lora else "paused (kept loaded)"),
                 "use_lora": form.use_lora})


@router.post("/v1/lora/scale", response_model=None,
             summary="Set the default adapters' scale (upstream's scale)", description=_LORA_DOC,
             openapi_extra=request_body(model_schema(ScaleLoRA), JSON, FORM),
             responses={**ok(Envelope[LoRAMessage]), **error_responses(400, 401)})
async def lora_scale(request: Request) -> Enveloped:
    """`scale` from -2 to 2 (upstream: 0 to 1); 0 is bit-identical to no adapter. With `adapter_name`, that
    adapter's scale only."""
    form: ScaleLoRA = await _form(request, ScaleLoRA)
    label = form.adapter_name.strip() if form.adapter_name else None
    await run_in_threadpool(adapters_of(request).defaults.scale, form.scale, label)
    out: dict[str, Any] = {"message": f"default adapter scale set to {form.scale:g}", "scale": form.scale}
    if label:
        out["adapter_name"] = label
    return wrap(out)


@router.get("/v1/lora/status", response_model=None, summary="The default adapters (upstream's status)",
            responses={**ok(Envelope[dict[str, Any]]), **error_responses(401)})
async def lora_status(request: Request) -> Enveloped:
    require_header(settings_of(request), request)
    services = adapters_of(request)
    return wrap(await run_in_threadpool(_status, request, services, True))


__all__ = ["router"]
