"""Request bodies for /openapi.json, generated from the pydantic models the routes parse with.

Routes that read their bodies themselves (JSON, form, multipart; upstream's aliases) have no
FastAPI body parameter, so their documented bodies come from here: /release_task's from
StrictRequest (each field under every name it answers to, handlers/aliases.py, at the top level and
inside `param_obj` / `metas`), the small routes' from the models in this module that they validate with.
tests/test_openapi_conformance.py holds the schema to the routes with schemathesis: a request the
schema allows is accepted, except for the rules listed in RELEASE_RULES that JSON Schema cannot
state (they depend on other fields or on the server) and the documented auth/limit answers.
"""
from __future__ import annotations

import copy
from typing import Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from engine.request import NEEDS_SOURCE

from .adapter_fields import field_schemas as adapter_field_schemas
from .aliases import ALIASES, EXTRA_SOURCES, SOURCE_ALIASES
from .fields import StrictRequest
from .results import MAX_ID_LEN, MAX_IDS

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
MAX_IDEMPOTENCY_KEY = 128

# 400 answers to schema-valid /release_task bodies: rules across fields or on server state.
RELEASE_RULES = (
    "needs source audio",  # task_type cover/repaint/lego/extract/complete, full_analysis_only
    "needs track_name", "needs complete_track_classes",
    "cfg_interval_start must be <= cfg_interval_end",
    "repainting_end must be greater than repainting_start",
    "timesteps must be strictly decreasing",
    "needs the 5Hz LM",  # sample_mode / sample_query / use_format / analysis on a server without one
    "src_audio", "reference_audio",  # an upload key that does not exist, a path outside the allowed dirs
    "webhook_url",  # a private or unresolvable host
    "adapter",  # names an adapter this server does not have, or one its model does not fit
)


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """The schema with every `$ref` to its `$defs` replaced by the definition (no components needed)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k not in ("$defs", "title")}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's validation schema, self-contained, by the names clients send (aliases)."""
    schema = model.model_json_schema(mode="validation", by_alias=True)
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))  # a dict stays a dict
    return inlined


def request_body(schema: dict[str, Any], *media: str, required: bool = True) -> dict[str, Any]:
    """A route's body: `schema` as JSON, and what of it a form can carry (scalars) as a form."""
    return {"requestBody": {"required": required, "content": {
        m: {"schema": _form_schema(schema) if m in (FORM, MULTIPART) else schema} for m in media}}}


# --- /release_task ------------------------------------------------------------------------------------

def _field_schemas() -> dict[str, dict[str, Any]]:
    """Canonical field name -> its schema, as StrictRequest validates it."""
    schema = StrictRequest.model_json_schema(mode="validation")
    generated, defs = schema["properties"], schema.get("$defs", {})
    out = {name: _inline(field, defs) for name, field in generated.items()
           if name not in ("src_audio_key", "reference_audio_key")}  # sources: SOURCE_ALIASES, below
    out["lm_backend"]["enum"] = ["vllm", "pt"]  # mlx: Apple silicon only, refused (fields.StrictRequest)
    # `seed` also takes one integer
    out["seeds"] = {"anyOf": [out["seeds"]["items"], {k: v for k, v in out["seeds"].items() if k != "anyOf"}
                              | {"type": "array"}, {"type": "null"}]}
    return out


def _named(fields: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every name a field answers to -> its schema (`format` is use_format, or given a format name,
    audio_format)."""
    out: dict[str, dict[str, Any]] = {}
    for name, schema in fields.items():
        for alias in ALIASES.get(name) or (name,):
            out.setdefault(alias, schema)
    out["format"] = {"anyOf": [fields["use_format"], fields["audio_format"]]}
    for alias, schema in adapter_field_schemas().items():  # adapter/adapter_scale, upstream's lora_name/lora_scale
        out.setdefault(alias, schema)
    for name, aliases in SOURCE_ALIASES.items():
        described = "an upload key from POST /v1/uploads" if name.endswith("_key") else \
            "a file on the server, inside ACESTEP_ALLOWED_AUDIO_DIRS"
        for alias in aliases:
            out[alias] = {"type": "string", "minLength": 1, "description": described}
    return out


def release_task_schema(model_names: Optional[list[str]] = None) -> dict[str, Any]:
    """/release_task's JSON body: every field under each of its names, also inside param_obj and
    one of the metas-like objects (read in that order, first found wins)."""
    fields = _field_schemas()
    if model_names:
        fields["model"] = {"anyOf": [{"type": "string", "enum": list(model_names)}, {"type": "null"}]}
    names = _named(fields)
    nested = {"type": "object", "properties": copy.deepcopy(names), "additionalProperties": True,
              "description": "the same fields (upstream sends some here); also as a JSON string of an object"}
    properties = {
        **names,
        "param_obj": nested,
        **{source: nested for source in EXTRA_SOURCES},
        "ai_token": {"type": "string", "description": "the API key (instead of the Authorization header)"},
        "webhook_url": {"type": "string", "format": "uri", "maxLength": 2048,
                        "description": "POSTed the final /query_result entry once the task ends"},
        "idempotency_key": {"type": "string", "pattern": f"^[ -~]{{1,{MAX_IDEMPOTENCY_KEY}}}$",
                            "description": "instead of the Idempotency-Key header"},
    }
    return {"type": "object", "properties": properties, "additionalProperties": True,
            "description": "Also rules JSON Schema cannot state: a 400 names them. task_type "
                           f"{', '.join(NEEDS_SOURCE)} needs source audio; " + "; ".join(RELEASE_RULES[1:6])}


def _form_schema(json_schema: dict[str, Any]) -> dict[str, Any]:
    """What a form can carry: the scalar fields (a form value is text; the readers parse it)."""
    def scalar(schema: dict[str, Any]) -> Optional[dict[str, Any]]:
        kept = [o for o in schema.get("anyOf", [schema]) if o.get("type") in ("string", "integer", "number", "boolean")]
        if not kept:
            return None
        out = {k: v for k, v in schema.items() if k not in ("anyOf", "default", "items", "maxItems", "minItems")}
        if "enum" in out:
            out["enum"] = [v for v in out["enum"] if v is not None]  # a form cannot send null
        return {**out, **kept[0]} if len(kept) == 1 else {**out, "anyOf": kept}
    props = {name: s for name, schema in json_schema["properties"].items() if (s := scalar(schema)) is not None}
    form = {"type": "object", "properties": props, "additionalProperties": True}
    if json_schema.get("required"):
        form["required"] = [name for name in json_schema["required"] if name in props]
    return form


def release_task_body(model_names: Optional[list[str]] = None) -> dict[str, Any]:
    body = request_body(release_task_schema(model_names), JSON, FORM, MULTIPART)
    files = {name: {"type": "string", "format": "binary"} for name in ("src_audio", "ctx_audio", "reference_audio",
                                                                         "ref_audio")}
    body["requestBody"]["content"][MULTIPART]["schema"]["properties"].update(files)
    return body


_ERROR_TEXT = {400: "Invalid input: the message names the field", 401: "Missing or wrong API key",
               403: "Not allowed", 404: "Not found", 408: "The body did not arrive in time",
               413: "Too large (body, stored request or task cost)", 415: "Unsupported content type",
               409: "Conflict: cancelled, or what it names changed before it ran",
               410: "Gone: the task's audio is no longer stored (expired or deleted)",
               422: "Not processable: an Idempotency-Key reused for another request, or a request the engine refused",
               429: "Limit reached: see Retry-After",
               503: "Unavailable (no worker or LM for it): see Retry-After", 504: "No answer in time",
               507: "Storage is full: see Retry-After"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route: `{"detail": ...}` with the status."""
    schema = {"type": "object", "properties": {"detail": {}}, "required": ["detail"]}
    return {code: {"description": _ERROR_TEXT[code], "content": {JSON: {"schema": schema}}} for code in codes}


def with_rate_limit_answers(openapi: dict[str, Any], methods: tuple[str, ...], exempt: tuple[str, ...]) -> dict[str, Any]:
    """The request-rate limiter answers 429 on every route it counts: documented there, whatever the route
    itself refuses (handlers/rate_limit.py decides which methods and paths it counts)."""
    counted = {m.lower() for m in methods}
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            if method in counted and path not in exempt:
                operation.setdefault("responses", {}).setdefault("429", error_responses(429)[429])
    return openapi


def with_model_names(openapi: dict[str, Any], model_names: list[str]) -> dict[str, Any]:
    """/release_task's `model` as the names this server serves (an unknown one is a 400)."""
    body = openapi.get("paths", {}).get("/release_task", {}).get("post", {}).get("requestBody")
    if body and model_names:
        fresh = release_task_body(model_names)["requestBody"]["content"]
        for media, content in body["content"].items():
            content["schema"] = fresh[media]["schema"]
    return openapi


# --- the small routes ---------------------------------------------------------------------------------

class QueryResultInput(BaseModel):
    """/query_result: ids as a list, a JSON string of one, or comma-separated (also `task_ids`, `task_id`)."""
    model_config = ConfigDict(extra="ignore")

    task_id_list: Optional[list[str] | str] = Field(
        None, validation_alias=AliasChoices("task_id_list", "task_ids", "task_id"),
        json_schema_extra={"anyOf": [{"type": "array", "maxItems": MAX_IDS, "items": {"type": "string"}},
                                     {"type": "string", "pattern": "^[^\\[]"}, {"type": "null"}]})
    ai_token: Optional[str] = None


class CancelTaskInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: str = Field(min_length=1, max_length=MAX_ID_LEN, pattern=r"\S")
    ai_token: Optional[str] = None


UPLOAD_TYPES = r"^(audio/[!-~]{1,94}|application/octet-stream|video/mp4|application/ogg)$"


class UploadInput(BaseModel):
    """POST /v1/uploads."""
    model_config = ConfigDict(extra="ignore")

    filename: str = Field(min_length=1, max_length=255, pattern=r"\S")
    content_type: Optional[str] = Field(None, pattern=UPLOAD_TYPES, max_length=100,
                                        validation_alias=AliasChoices("content_type", "contentType"))
    role: Optional[Literal["src_audio", "reference_audio"]] = None
    ai_token: Optional[str] = None


def format_input_schema() -> dict[str, Any]:
    """/format_input's body: /release_task's fields (StrictRequest) under this route's names."""
    fields = _field_schemas()
    meta = {"duration": fields["audio_duration"], "bpm": fields["bpm"], "key": fields["key_scale"],
            "key_scale": fields["key_scale"], "language": fields["vocal_language"],
            "vocal_language": fields["vocal_language"], "time_signature": fields["time_signature"]}
    return {"type": "object", "additionalProperties": True, "properties": {
        "prompt": fields["prompt"], "caption": fields["prompt"], "lyrics": fields["lyrics"],
        "temperature": fields["lm_temperature"], "time_signature": fields["time_signature"],
        "param_obj": {"type": "object", "properties": meta, "additionalProperties": True,
                      "description": "also as a JSON string of an object"},
        "ai_token": {"type": "string"}}}


def create_sample_schema() -> dict[str, Any]:
    """/v1/create_sample's body: /release_task's fields (StrictRequest) under this route's names."""
    fields = _field_schemas()
    return {"type": "object", "additionalProperties": True, "properties": {
        "query": fields["sample_query"], "instrumental": fields["thinking"],
        "vocal_language": fields["vocal_language"], "temperature": fields["lm_temperature"],
        "ai_token": {"type": "string"}}}


class RandomSampleInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sample_type: Optional[str] = Field("simple_mode", description="simple_mode, or anything else for a full request")
    ai_token: Optional[str] = None


__all__ = ["CancelTaskInput", "QueryResultInput", "RELEASE_RULES", "RandomSampleInput", "UploadInput",
           "create_sample_schema", "error_responses", "format_input_schema", "model_schema", "release_task_body", "release_task_schema",
           "request_body", "with_model_names"]
