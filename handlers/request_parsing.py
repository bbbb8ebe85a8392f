"""A parsed /release_task body -> a validated GenerationRequest plus where its audio comes from.

Pure: no settings, blob store or file system (service/sources.py reads the audio at submit time).
`read_sources` shapes the body for `ReleaseTaskInput` (fields.py), and `validation_message` is
the one place a pydantic ValidationError becomes the 400 text: each field as the client named it
("param_obj.duration (audio_duration)") and what it allows ("must be between 10 and 600").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

from pydantic import AliasChoices, AliasPath, BaseModel, ValidationError
from pydantic_core import ErrorDetails

from engine.request import DECLARED_SOURCES, GenerationRequest
from service.sources import AudioSource, SentFile, ServerPath, UploadKey
from service.submission import Upload

from .body import FilePart
from .envelope import bad_request
from .fields import (BOOL_FALSE, BOOL_TRUE, EXTRA_SOURCES, LOCS, MODEL_NAMES, SOURCE_ALIASES, ReleaseTaskInput,
                     to_bool, to_optstr)

# Multipart file fields per role (upstream names first).
FILE_FIELDS = {
    "src_audio": ("src_audio", "ctx_audio"),
    "reference_audio": ("reference_audio", "ref_audio"),
}

Loc = tuple  # where a value sits in the body: ("bpm",) or ("param_obj", "duration")
_SOURCE_NAMES = frozenset(name for aliases in SOURCE_ALIASES.values() for name in aliases)


@dataclass(frozen=True)
class ParsedTask:
    request: GenerationRequest
    sources: tuple[AudioSource, ...] = ()


@dataclass
class PreparedBody:
    data: dict  # what ReleaseTaskInput validates
    sources: list[AudioSource] = field(default_factory=list)
    renamed: dict[Loc, Loc] = field(default_factory=dict)  # moved value -> where the client put it


def parse_release_task(fields: dict, files: Optional[Mapping[str, FilePart]] = None, *,
                       model_names: Sequence[str] = ()) -> ParsedTask:
    """Raises a 400 ApiError naming each bad field; an unknown `model` lists `model_names`."""
    try:
        body = read_sources(fields, files or {})
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    context = {MODEL_NAMES: list(model_names), DECLARED_SOURCES: {s.role for s in body.sources}}
    try:
        parsed = ReleaseTaskInput.model_validate(body.data, context=context)
    except ValidationError as exc:
        raise bad_request(validation_message(exc, ReleaseTaskInput, body.renamed)) from None
    return ParsedTask(request=parsed, sources=tuple(body.sources))


# --- the body's sources -----------------------------------------------------------------------------

def parse_object(value: Any, name: str) -> Optional[dict]:
    """An extra source given as an object or a JSON string of one; empty means absent."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f"{name}: must be a JSON object or a JSON string of one") from None
        if value is None or value == {}:
            return None
    if isinstance(value, dict):
        return value
    raise ValueError(f"{name}: must be a JSON object or a JSON string of one")


def without_none(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if v is not None}  # None means "not given": the next alias is tried


def _first(data: dict, name: str) -> Optional[tuple[Loc, Any]]:
    """Where the value ReleaseTaskInput reads for `name` sits in `data`, and the value (None: absent)."""
    for loc in LOCS[name]:
        if len(loc) == 1:
            if loc[0] in data:
                return loc, data[loc[0]]
        elif loc[1] in data.get(loc[0], ()):
            return loc, data[loc[0]][loc[1]]
    return None


def _holder(data: dict, loc: Loc) -> dict:
    return data if len(loc) == 1 else data[loc[0]]


def _take(data: dict, name: str) -> Optional[tuple[Loc, Any]]:
    """What ReleaseTaskInput would read for `name`, with every value for it removed from `data`."""
    found = _first(data, name)
    while (hit := _first(data, name)) is not None:
        del _holder(data, hit[0])[hit[0][-1]]
    return found


def read_sources(fields: dict, files: Mapping[str, FilePart]) -> PreparedBody:
    """Upstream's sources as ReleaseTaskInput's aliases expect them, audio sources taken out.

    Top-level fields; `param_obj` as an object (also from a JSON string); of the metas-like sources
    only the first truthy one. Raises ValueError with a client-facing message.
    """
    data = without_none({k: v for k, v in fields.items() if k != "param_obj" and k not in EXTRA_SOURCES})
    param_obj = parse_object(fields.get("param_obj"), "param_obj")
    if param_obj:
        data["param_obj"] = without_none(param_obj)
    for name in EXTRA_SOURCES:
        if fields.get(name):  # the first truthy one, as upstream
            extra = parse_object(fields[name], name)
            if extra:
                data[name] = without_none(extra)
            break
    body = PreparedBody(data)
    sent = set(data).union(*(v for v in data.values() if isinstance(v, dict)))  # every name, any source
    if "format" in sent:
        _format_field(body)
    if "instrumental" in sent:
        _instrumental(body)
    if files or not sent.isdisjoint(_SOURCE_NAMES):
        _audio_sources(body, files, sent)
    return body


def _instrumental(body: PreparedBody) -> None:
    """`instrumental` with no lyrics (simple_mode output fed back) means "[Instrumental]" lyrics."""
    found = _first(body.data, "instrumental")
    try:
        flag = found is not None and to_bool(found[1])
    except ValueError:
        return  # ReleaseTaskInput names the bad value
    lyrics = _first(body.data, "lyrics")
    if flag and (lyrics is None or (isinstance(lyrics[1], str) and not lyrics[1].strip())):
        body.data["lyrics"] = "[Instrumental]"  # top level: wins over a blank one anywhere


def _format_field(body: PreparedBody) -> None:
    """`format` is upstream's alias of use_format, but clients also send "format": "mp3"."""
    found = _first(body.data, "use_format")
    if found is None or found[0][-1] != "format":
        return
    loc, value = found
    if not isinstance(value, str) or value.strip().lower() in BOOL_TRUE | BOOL_FALSE | {""}:
        return
    del _holder(body.data, loc)["format"]
    if _first(body.data, "audio_format") is None:  # an explicit audio_format wins
        _holder(body.data, loc)["audio_format"] = value
        body.renamed[loc[:-1] + ("audio_format",)] = loc


def _audio_sources(body: PreparedBody, files: Mapping[str, FilePart], sent: set[str]) -> None:
    """Per role: a multipart file, else an upload key, else a server path. None of them is a
    request field, so each is taken out of the data whichever wins."""
    for role, file_fields in FILE_FIELDS.items():
        declared = {kind: None if sent.isdisjoint(SOURCE_ALIASES[f"{role}_{kind}"])  # the common case
                    else _take(body.data, f"{role}_{kind}") for kind in ("key", "path")}
        file_field = next((name for name in file_fields if name in files), None)
        if file_field is not None:
            part = files[file_field]
            upload = Upload(part.data, part.filename or role, part.content_type)
            body.sources.append(SentFile(role, upload, file_field))
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
                body.sources.append(source_type(role, text, label))
                break


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
            out.setdefault(tuple(choice.path) if isinstance(choice, AliasPath) else (choice,), name)
    return out


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def field_range(name: str) -> str:
    """'must be between 30 and 300' etc., read from GenerationRequest's own constraints."""
    info = GenerationRequest.model_fields.get(name)
    lo = hi = None
    for m in (info.metadata if info is not None else ()):
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
    if lo is not None and hi is not None:
        return f"must be between {_num(lo)} and {_num(hi)}"
    if hi is not None:
        return f"must be at most {_num(hi)}"
    if lo is not None:
        return f"must be at least {_num(lo)}"
    return "is out of range"


def _error_text(err: ErrorDetails, model: type[BaseModel], renamed: Mapping[Loc, Loc]) -> str:
    loc = tuple(err.get("loc") or ())
    by_path = _fields_by_path(model)
    label, name = "", ""
    for end in range(len(loc), 0, -1):  # the field's own path; list items add indices after it
        if loc[:end] in by_path:
            name = by_path[loc[:end]]
            label = field_label(renamed.get(loc[:end], loc[:end]), name)
            break
    etype = err.get("type", "")
    given = err.get("input")
    ctx = err.get("ctx") or {}
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        text = f"{field_range(name)} (got {_num(given)})"
    elif etype == "literal_error":
        options = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", "")))) or str(ctx.get("expected", ""))
        text = f"must be one of {options} (got {given!r})"
    elif etype == "string_too_long":
        text = f"must be at most {ctx.get('max_length')} characters (got {len(given) if isinstance(given, str) else '?'})"
    else:
        text = msg
        if loc and isinstance(given, (str, int, float)) and not isinstance(given, bool) \
                and len(str(given)) <= 40 and "(got" not in text and repr(given) not in text:
            text = f"{text} (got {given!r})"
    return f"{label}: {text}" if label else text


def validation_message(exc: ValidationError, model: type[BaseModel] = ReleaseTaskInput,
                       renamed: Optional[Mapping[Loc, Loc]] = None) -> str:
    return "; ".join(_error_text(e, model, renamed or {}) for e in exc.errors())


__all__ = ["FILE_FIELDS", "ParsedTask", "field_label", "parse_object", "parse_release_task", "read_sources",
           "validation_message", "without_none"]
