"""A /release_task body -> a validated GenerationRequest plus where its audio comes from.

Pure: no settings, blob store or file system (service/sources.py reads the audio at submit time).
Parsed once: upstream's names are resolved to canonical ones first (handlers/aliases.py), the audio
sources taken out, then the canonical values validated by StrictRequest (fields.py). Every other
entry (the chat API, /format_input) builds a `Canonical` itself and calls `validate_canonical`.
`validation_message` is the one place a pydantic ValidationError becomes the 400 text: each field as
the client named it ("param_obj.duration (audio_duration)") and what it allows ("must be between 10
and 600").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

from pydantic import AliasChoices, AliasPath, BaseModel, ValidationError
from pydantic_core import ErrorDetails

from engine.request import DECLARED_SOURCES, GenerationRequest
from service.sources import AudioSource, SentFile, ServerPath, UploadKey
from service.submission import Upload

from .aliases import Canonical, Loc, resolve
from .body import FilePart
from .envelope import bad_request
from .fields import MODEL_NAMES, StrictRequest, shown, to_bool, to_optstr

# Multipart file fields per role (upstream names first).
FILE_FIELDS = {
    "src_audio": ("src_audio", "ctx_audio"),
    "reference_audio": ("reference_audio", "ref_audio"),
}
ROLES = tuple(FILE_FIELDS)


@dataclass(frozen=True)
class ParsedTask:
    request: GenerationRequest
    sources: tuple[AudioSource, ...] = ()


def parse_release_task(fields: Mapping[str, Any], files: Optional[Mapping[str, FilePart]] = None, *,
                       model_names: Sequence[str] = ()) -> ParsedTask:
    """Raises a 400 ApiError naming each bad field; an unknown `model` lists `model_names`."""
    try:
        canonical = resolve(fields)
        sent = {role: _sent_file(role, files or {}) for role in ROLES}
        sources = audio_sources(canonical, sent)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return ParsedTask(validate_canonical(canonical, sources, model_names=model_names), tuple(sources))


def validate_canonical(canonical: Canonical, sources: Sequence[AudioSource] = (), *,
                       model_names: Sequence[str] = ()) -> StrictRequest:
    """The one validation: canonical values -> StrictRequest; a 400 names each bad field by its origin."""
    _instrumental(canonical)
    context = {MODEL_NAMES: list(model_names), DECLARED_SOURCES: {s.role for s in sources}}
    try:
        return StrictRequest.model_validate(canonical.values, context=context)
    except ValidationError as exc:
        raise bad_request(validation_message(exc, StrictRequest, canonical.origins)) from None


def _instrumental(canonical: Canonical) -> None:
    """`instrumental` with no lyrics (simple_mode output fed back) means "[Instrumental]" lyrics."""
    try:
        flag = to_bool(canonical.values.get("instrumental", False))
    except ValueError:
        return  # StrictRequest names the bad value
    lyrics = canonical.values.get("lyrics")
    if flag and (lyrics is None or (isinstance(lyrics, str) and not lyrics.strip())):
        canonical.put("lyrics", "[Instrumental]", ("lyrics",))


# --- the body's audio sources ------------------------------------------------------------------------

def _sent_file(role: str, files: Mapping[str, FilePart]) -> Optional[SentFile]:
    name = next((n for n in FILE_FIELDS[role] if n in files), None)
    if name is None:
        return None
    part = files[name]
    return SentFile(role, Upload(part.data, part.filename or role, part.content_type), name)


def audio_sources(canonical: Canonical, files: Mapping[str, Optional[SentFile]]) -> list[AudioSource]:
    """Per role: a sent file, else an upload key, else a server path. None of them is a request field, so
    each is taken out of `canonical` whichever wins. Raises ValueError with a client-facing message."""
    sources: list[AudioSource] = []
    for role in ROLES:
        declared = {kind: canonical.pop(f"{role}_{kind}") for kind in ("key", "path")}
        sent = files.get(role)
        if sent is not None:
            sources.append(sent)
            continue
        for kind, source_type in (("key", UploadKey), ("path", ServerPath)):
            found = declared[kind]
            if found is None:
                continue
            loc, value = found
            label = field_label(loc, f"{role}_{kind}")
            try:
                text = to_optstr(value)
            except ValueError as exc:
                raise ValueError(f"{label}: {exc}") from None
            if text:  # "" falls through to the next kind, as upstream
                sources.append(source_type(role, text, label))
                break
    return sources


# --- pydantic errors -> one readable message -------------------------------------------------------

def field_label(path: Loc, canonical: str) -> str:
    """How an error names a field: as sent, plus the canonical name when that differs."""
    shown = "seed" if canonical == "seeds" else canonical
    name = ".".join(str(p) for p in path)
    return name if path[-1] == shown else f"{name} ({shown})"


@lru_cache(maxsize=None)
def _fields_by_path(model: type[BaseModel]) -> dict[Loc, str]:
    out: dict[Loc, str] = {}
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias or name]
        for choice in choices:
            out.setdefault(tuple(str(p) for p in choice.path) if isinstance(choice, AliasPath) else (str(choice),), name)
    return out


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def field_range(name: str) -> str:
    """'must be between 30 and 300' etc., read from GenerationRequest's own constraints (ge/le, gt/lt)."""
    info = GenerationRequest.model_fields.get(name)
    bounds: dict[str, Any] = {}
    for m in (info.metadata if info is not None else ()):
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                bounds[key] = getattr(m, key)
    lower = f"at least {_num(bounds['ge'])}" if "ge" in bounds else \
        f"greater than {_num(bounds['gt'])}" if "gt" in bounds else None
    upper = f"at most {_num(bounds['le'])}" if "le" in bounds else \
        f"less than {_num(bounds['lt'])}" if "lt" in bounds else None
    if "ge" in bounds and "le" in bounds:
        return f"must be between {_num(bounds['ge'])} and {_num(bounds['le'])}"
    if lower and upper:
        return f"must be {lower} and {upper}"
    if lower or upper:
        return f"must be {lower or upper}"
    return "is out of range"


def _error_text(err: ErrorDetails, model: type[BaseModel], origins: Mapping[str, Loc]) -> str:
    loc = tuple(str(p) for p in err.get("loc") or ())
    by_path = _fields_by_path(model)
    label, name = "", ""
    for end in range(len(loc), 0, -1):  # the field's own path; list items add indices after it
        if loc[:end] in by_path:
            name = by_path[loc[:end]]
            label = field_label(origins.get(name, loc[:end]), name)
            break
    etype = err.get("type", "")
    given = err.get("input")
    ctx = err.get("ctx") or {}
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        text = f"{field_range(name)} (got {_num(given)})"
    elif etype == "literal_error":
        options = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", "")))) or str(ctx.get("expected", ""))
        text = f"must be one of {options} (got {shown(given)})"
    elif etype == "string_too_long":
        text = f"must be at most {ctx.get('max_length')} characters (got {len(given) if isinstance(given, str) else '?'})"
    else:
        text = msg
        if loc and isinstance(given, (str, int, float)) and not isinstance(given, bool) \
                and len(str(given)) <= 40 and "(got" not in text and repr(given) not in text:
            text = f"{text} (got {given!r})"
    return f"{label}: {text}" if label else text


def validation_message(exc: ValidationError, model: type[BaseModel] = StrictRequest,
                       origins: Optional[Mapping[str, Loc]] = None) -> str:
    """`origins`: where each field's value came from (canonical name -> as sent), for the labels."""
    return "; ".join(_error_text(e, model, origins or {}) for e in exc.errors())


__all__ = ["FILE_FIELDS", "ParsedTask", "audio_sources", "field_label", "parse_release_task", "validate_canonical",
           "validation_message"]
