"""Turn a parsed /release_task body into a validated GenerationRequest plus its audio uploads.

Field lookup and coercion live in `fields.py`; this module adds the checks that need the
settings or the blob store (model names, audio sources) and turns pydantic errors into one
400 message that names each field and its allowed range.
"""
from __future__ import annotations

import mimetypes
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from engine.request import AUDIO_FORMATS, GenerationRequest
from service import blob_keys
from service.config import Settings
from service.ports import Backend
from service.submission import Upload

from .body import FilePart, upload_limit
from .envelope import bad_request, too_large
from .fields import AUDIO_FIELDS, BOOL_FALSE, BOOL_TRUE, FIELDS, Found, coerce, find, sources

# Multipart file fields per role (upstream names first).
FILE_FIELDS = {
    "src_audio": ("src_audio", "ctx_audio"),
    "reference_audio": ("reference_audio", "ref_audio"),
}
_PLACEHOLDER = blob_keys.PENDING_UPLOADS_PREFIX + "placeholder"  # replaced by submit_task with the real upload key


@dataclass
class ParsedTask:
    request: GenerationRequest
    uploads: dict[str, Upload] = field(default_factory=dict)

    def request_dump(self) -> dict:
        """What submit_task stores; upload roles get their keys from submit_task itself."""
        data = self.request.model_dump()
        for role in self.uploads:
            data.pop(f"{role}_key", None)
        return data


# --- pydantic errors -> one readable message ---------------------------------------------------

def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def field_range(name: str) -> str:
    """'must be between 30 and 300' etc., read from GenerationRequest's own constraints."""
    info = GenerationRequest.model_fields.get(name)
    lo = hi = None
    if info is not None:
        for m in info.metadata:
            lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
            hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
    if lo is not None and hi is not None:
        return f"must be between {_num(lo)} and {_num(hi)}"
    if hi is not None:
        return f"must be at most {_num(hi)}"
    if lo is not None:
        return f"must be at least {_num(lo)}"
    return "is out of range"


def _error_text(err: dict, labels: dict[str, str]) -> str:
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else ""
    label = labels.get(name, "seed" if name == "seeds" else name)
    etype = err.get("type", "")
    given = err.get("input")
    msg = str(err.get("msg", ""))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        text = f"{field_range(name)} (got {_num(given)})"
    elif etype == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        options = ", ".join(re.findall(r"'([^']*)'", str(expected))) or str(expected)
        text = f"must be one of {options} (got {given!r})"
    elif etype == "string_too_long":
        limit = (err.get("ctx") or {}).get("max_length")
        text = f"must be at most {limit} characters (got {len(given) if isinstance(given, str) else '?'})"
    elif etype == "extra_forbidden":
        text = "is not a known field"
    else:
        text = msg
        if loc and isinstance(given, (str, int, float)) and not isinstance(given, bool) \
                and len(str(given)) <= 40 and "(got" not in text:
            text = f"{text} (got {given!r})"
    return f"{label}: {text}" if label else text


def validation_message(exc: ValidationError, labels: dict[str, str]) -> str:
    return "; ".join(_error_text(e, labels) for e in exc.errors())


# --- audio sources -------------------------------------------------------------------------------

def _within(path: str, roots: list[str]) -> bool:
    for root in roots:
        if not root:
            continue
        real_root = os.path.realpath(root)
        if path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep):
            return True
    return False


def _read_server_file(path: str, label: str, role: str, settings: Settings) -> Upload:
    if "\x00" in path or len(path) > 4096:
        raise bad_request(f"{label}: not a valid file path")
    real = os.path.realpath(path)
    if not _within(real, list(settings.allowed_audio_dirs or [])):
        raise bad_request(
            f"{label}: server file paths are not accepted here; upload the file instead "
            f"(multipart field '{role}', or POST /v1/uploads and send '{role}_key')")
    if not os.path.isfile(real):
        raise bad_request(f"{label}: file not found")
    limit = upload_limit(settings)
    if os.path.getsize(real) > limit:
        raise too_large(limit, f"{label} file")
    with open(real, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit, f"{label} file")
    name = os.path.basename(real)
    return Upload(data=data, filename=name,
                  content_type=mimetypes.guess_type(name)[0] or "application/octet-stream")


def _check_pending_key(key: str, label: str, backend: Backend, settings: Settings) -> str:
    if not blob_keys.is_pending_upload_key(key):
        raise bad_request(f"{label}: not an upload key; create one with POST /v1/uploads "
                          f"(keys look like '{blob_keys.PENDING_UPLOADS_PREFIX}<id>/<name>')")
    size = backend.blobs.size(key)
    if size is None:
        raise bad_request(f"{label}: nothing was uploaded under this key (PUT the file to its upload_url first)")
    if size > settings.max_upload_mb * 1024 * 1024:  # a presigned PUT cannot cap the size itself
        raise too_large(settings.max_upload_mb * 1024 * 1024, f"Upload {label!r}")
    return key


def _resolve_audio(srcs, files: dict[str, FilePart], settings: Settings, backend: Backend,
                   values: dict, labels: dict[str, str]) -> dict[str, Upload]:
    uploads: dict[str, Upload] = {}
    for role, names in FILE_FIELDS.items():
        part = next((files[n] for n in names if n in files), None)
        if part is not None:
            uploads[role] = Upload(data=part.data, filename=part.filename or role,
                                   content_type=part.content_type)
            values[f"{role}_key"] = _PLACEHOLDER
            continue
        key_found = find(srcs, f"{role}_key", AUDIO_FIELDS[f"{role}_key"])
        key = coerce("optstr", key_found.value, key_found.label) if key_found else None
        if key:
            values[f"{role}_key"] = _check_pending_key(key, key_found.label, backend, settings)
            labels[f"{role}_key"] = key_found.label
            continue
        path_found = find(srcs, f"{role}_path", AUDIO_FIELDS[f"{role}_path"])
        path = coerce("optstr", path_found.value, path_found.label) if path_found else None
        if path:
            uploads[role] = _read_server_file(path, path_found.label, role, settings)
            values[f"{role}_key"] = _PLACEHOLDER
            labels[f"{role}_key"] = path_found.label
    return uploads


# --- the whole request ---------------------------------------------------------------------------

def _use_format(found: Found, values: dict, labels: dict[str, str]) -> None:
    """`format` is an upstream alias of use_format, but clients also send "format": "mp3"."""
    v = found.value
    alias = found.label.split(" ")[0].rsplit(".", 1)[-1]
    if alias == "format" and isinstance(v, str) \
            and v.strip().lower() not in BOOL_TRUE | BOOL_FALSE | {""}:
        if "audio_format" not in values:
            values["audio_format"] = v.strip().lower()
            labels["audio_format"] = found.label
        return
    value = coerce("bool", v, found.label)
    if value is not None:
        values["use_format"] = value
        labels["use_format"] = found.label


def parse_generation_request(fields: dict, files: Optional[dict[str, FilePart]], settings: Settings,
                             backend: Backend) -> ParsedTask:
    """Resolve aliases and sources, coerce, check model/audio, validate. Raises 400/413 ApiError."""
    srcs = sources(fields)
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for canonical, spec in FIELDS.items():
        if canonical == "use_format":
            continue
        found = find(srcs, canonical, spec)
        if found is None:
            continue
        value = coerce(spec.kind, found.value, found.label)
        if value is not None:
            values[canonical] = value
            labels[canonical] = found.label
    found = find(srcs, "use_format", FIELDS["use_format"])
    if found is not None:
        _use_format(found, values, labels)

    fmt = values.get("audio_format")
    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise bad_request(f"{labels['audio_format']}: must be one of {', '.join(AUDIO_FORMATS)} (got {fmt!r})")

    model = values.get("model")
    names = settings.model_names
    if model is not None and names and model not in names:
        raise bad_request(f"{labels['model']}: unknown model {model!r}; available: {', '.join(names)}")

    inst = find(srcs, "instrumental", AUDIO_FIELDS["instrumental"])
    if inst is not None and coerce("bool", inst.value, inst.label) and not values.get("lyrics", "").strip():
        values["lyrics"] = "[Instrumental]"  # /create_random_sample's simple_mode output fed back

    uploads = _resolve_audio(srcs, files or {}, settings, backend, values, labels)

    try:
        request = GenerationRequest(**values)
    except ValidationError as exc:
        raise bad_request(validation_message(exc, labels)) from None
    return ParsedTask(request=request, uploads=uploads)
