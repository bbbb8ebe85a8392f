"""Read a POST body into a flat dict of fields (+ uploaded files), by content type.

Dispatch follows upstream §2.1.1: JSON (`application/json` or `+json`), multipart/form-data,
x-www-form-urlencoded, and otherwise the raw body sniffed as JSON (`{`/`[`) or a query string
(`a=1&b=2`); anything else is 415. Every client mistake is a 4xx, never a 500.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Optional
from urllib.parse import parse_qs

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from service.config import Settings
from service.json_types import JSONValue

from .auth import header_is_valid, refuse_wrong_header, require_body_or_header
from .envelope import ApiError, bad_request, too_large
from .off_loop import parse_off_loop

MB = 1024 * 1024
# The whole body must arrive within this many seconds (uvicorn has no body timeout of its own).
BODY_READ_TIMEOUT = 60.0
_BOUNDARY = re.compile(r'boundary="?([^";,]+)"?', re.I)
# Non-multipart bodies carry only text fields; 2 MB is far above any valid request.
TEXT_BODY_LIMIT = 2 * MB
UNSUPPORTED = ("Unsupported Content-Type: {ct}; use application/json, "
               "application/x-www-form-urlencoded, or multipart/form-data")
NOT_AN_OBJECT = "JSON payload must be an object"
RAW_JSON_INVALID = "Invalid JSON body (hint: set 'Content-Type: application/json')"


@dataclass
class FilePart:
    data: bytes
    filename: str = ""
    content_type: str = "application/octet-stream"


@dataclass
class ParsedBody:
    kind: str  # json | multipart | form | raw-json | raw-form | empty
    fields: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)
    size: int = 0  # bytes of the body: how much work parsing its fields may be (handlers/off_loop.py)


def upload_limit(settings: Settings) -> int:
    return settings.max_upload_bytes


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _declared_length(request: Request, limit: int, what: str) -> Optional[int]:
    """The Content-Length, if any; 413 at once when it is over `limit`."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        expected = int(declared)
    except ValueError:
        raise bad_request("Invalid Content-Length header") from None
    if expected > limit:
        raise too_large(limit, what)
    return expected


async def read_limited(request: Request, limit: int, what: str = "Request body",
                       timeout: float = BODY_READ_TIMEOUT) -> bytes:
    """The whole body, or 413 as soon as it passes `limit` (Content-Length is checked first), 408 when
    it takes longer than `timeout` to arrive (a slow client must not hold a server slot), 400 when it
    is shorter than its Content-Length."""
    expected = _declared_length(request, limit, what)
    chunks: list[bytes] = []
    size = 0
    # One timer for the whole body (asyncio.timeout), not a task per chunk (wait_for): this runs on
    # every request, and the polling path is measured in fractions of a millisecond.
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit, what)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"{what} not received within {timeout:g} s") from None
    except ClientDisconnect:
        raise bad_request(f"{what} truncated: the client closed the connection") from None
    if expected is not None and size != expected:
        raise bad_request(f"{what} truncated: {size} of {expected} bytes (Content-Length) arrived")
    return b"".join(chunks)


def _json_object(body: bytes, invalid_message: Optional[str] = None) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise bad_request(invalid_message or f"Invalid JSON body: {_short(exc)}") from None
    if not isinstance(value, dict):
        raise bad_request(NOT_AN_OBJECT)
    try:
        _check_text(value)
    except (UnicodeEncodeError, RecursionError):
        raise bad_request("Invalid JSON body: strings must be valid Unicode (no unpaired surrogates)") from None
    return value


def _check_text(value: JSONValue) -> None:
    """Raise UnicodeEncodeError for a lone surrogate anywhere (it cannot be stored or echoed)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _query_string(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("Invalid form body: not UTF-8") from None
    try:
        parsed = parse_qs(text, keep_blank_values=True, max_num_fields=2000)
    except ValueError as exc:
        raise bad_request(f"Invalid form body: {_short(exc)}") from None
    return {k: v[0] for k, v in parsed.items() if v}


def _closing_delimiter(request: Request) -> bytes:
    """A multipart body ends with `--<boundary>--`; one cut short is refused (the form parser would
    otherwise keep whatever parts arrived)."""
    match = _BOUNDARY.search(request.headers.get("content-type", ""))
    if match is None:
        raise bad_request("Invalid multipart body: the Content-Type has no boundary")
    return b"--" + match.group(1).encode("latin-1") + b"--"


class _StreamedBody:
    """The body as it arrives, for the multipart parser (which spools files to disk past 1 MB):
    read_limited's checks (limit, deadline, Content-Length) without holding the body in memory,
    and whether the closing delimiter went by (searched across chunk edges)."""

    def __init__(self, request: Request, limit: int, delimiter: bytes, timeout: float = BODY_READ_TIMEOUT):
        self.request, self.limit, self.delimiter, self.timeout = request, limit, delimiter, timeout
        self.size, self.closed = 0, False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        what = "Request body"
        expected = _declared_length(self.request, self.limit, what)
        deadline = asyncio.get_running_loop().time() + self.timeout
        carry = b""
        stream = self.request.stream().__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # around the read only, never the parser
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ApiError(408, f"{what} not received within {self.timeout:g} s") from None
            except ClientDisconnect:
                raise bad_request(f"{what} truncated: the client closed the connection") from None
            self.size += len(chunk)
            if self.size > self.limit:
                raise too_large(self.limit, what)
            window = carry + chunk
            self.closed = self.closed or self.delimiter in window
            carry = window[-(len(self.delimiter) - 1):]
            yield chunk
        if expected is not None and self.size != expected:
            raise bad_request(f"{what} truncated: {self.size} of {expected} bytes (Content-Length) arrived")
        if not self.closed:
            raise bad_request("Invalid multipart body: truncated (the closing boundary is missing)")


async def _multipart(request: Request, settings: Settings, files_allowed: bool) -> ParsedBody:
    limit = upload_limit(settings)
    body = _StreamedBody(request, 2 * limit + TEXT_BODY_LIMIT, _closing_delimiter(request))
    try:
        form = await MultiPartParser(request.headers, body.chunks(), max_files=8, max_fields=2000,
                                     max_part_size=TEXT_BODY_LIMIT).parse()
    except ApiError:
        raise
    except Exception as exc:  # MultiPartException / a malformed boundary
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or _short(exc)
        raise bad_request(f"Invalid multipart body: {detail}") from None
    out = ParsedBody(kind="multipart", size=body.size)
    try:
        if files_allowed and not header_is_valid(settings, request):
            # The key may be a form field: check it before any upload is read into memory.
            require_body_or_header(settings, request, form.get("ai_token"))
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if not files_allowed:
                    continue
                data = await value.read(limit + 1)
                if len(data) > limit:
                    raise too_large(limit, f"Upload {name!r}")
                if not data and not value.filename:
                    continue  # an empty <input type=file> sends an empty part
                if name not in out.files:
                    out.files[name] = FilePart(data=data, filename=value.filename or "",
                                               content_type=value.content_type or "application/octet-stream")
            elif name not in out.fields:
                out.fields[name] = value
    finally:
        await form.close()
    return out


async def read_body(request: Request, settings: Settings, *, files_allowed: bool = False,
                    empty_ok: bool = False) -> ParsedBody:
    """Parse the request body into fields; `empty_ok` lets a missing/empty body mean `{}`."""
    refuse_wrong_header(settings, request)  # nothing read for a wrong key (handlers/body_budget.py)
    mt = media_type(request)
    if mt == "multipart/form-data":
        return await _multipart(request, settings, files_allowed)
    body = await read_limited(request, TEXT_BODY_LIMIT)
    # A 2 MB body of many small values takes ~0.1 s to decode: big ones off the event loop
    size = len(body)
    if mt == "application/json" or mt.endswith("+json"):
        if not body.strip():
            if empty_ok:
                return ParsedBody(kind="empty")
            raise bad_request("Invalid JSON body: the body is empty")
        return ParsedBody(kind="json", size=size, fields=await parse_off_loop(size, _json_object, body))
    if mt == "application/x-www-form-urlencoded":
        return ParsedBody(kind="form", size=size, fields=await parse_off_loop(size, _query_string, body))
    stripped = body.strip()
    if stripped[:1] in (b"{", b"["):
        fields = await parse_off_loop(size, _json_object, stripped, RAW_JSON_INVALID)
        return ParsedBody(kind="raw-json", size=size, fields=fields)
    if b"=" in stripped:
        return ParsedBody(kind="raw-form", size=size, fields=await parse_off_loop(size, _query_string, stripped))
    if not stripped and empty_ok:
        return ParsedBody(kind="empty")
    raise ApiError(415, UNSUPPORTED.format(ct=request.headers.get("content-type") or "(missing)"))
