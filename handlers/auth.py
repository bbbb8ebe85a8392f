"""API-key authentication (upstream §4): `Authorization: Bearer <key>` (or the raw key), or a
body `ai_token` on routes that take a body. Disabled when settings.api_key is empty.

A Bearer (or raw) key in the header that is wrong is refused before the body is read
(refuse_wrong_header), so a caller that sends one holds no body memory (handlers/body_budget.py); upstream
would still accept such a request when its body's `ai_token` is right. Another scheme (`Basic`, which a
proxy's auth_basic forwards) claims no key of ours: the body's `ai_token` decides, as upstream.
"""
from __future__ import annotations

import hmac
from typing import Any, Optional

from fastapi import Request

from service.config import Settings

from .envelope import ApiError

MISSING_BODY_AUTH = "Missing ai_token or Authorization header"
MISSING_HEADER = "Missing Authorization header"
INVALID_KEY = "Invalid API key"
INVALID_TOKEN = "Invalid ai_token"


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def bearer_key(value: str) -> str:
    """The key in an Authorization header: "Bearer <key>" (the scheme is case-insensitive, RFC 9110
    11.1) or the raw key."""
    value = value.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def header_is_valid(settings: Settings, request: Request) -> bool:
    """True when auth is off or the Authorization header carries the key."""
    if not settings.api_key:
        return True
    value = request.headers.get("authorization")
    return bool(value and _equal(bearer_key(value), settings.api_key))


def require_header(settings: Settings, request: Request) -> None:
    """Header-only routes (/v1/stats, /v1/models, /v1/audio, /docs ...)."""
    if settings.api_key:
        _check_header(settings, request, MISSING_HEADER)


def claims_a_key(value: str) -> bool:
    """True when an Authorization header offers one of our keys: `Bearer <key>` or a raw key (one word, no
    scheme). `Basic ...` and other schemes offer something else."""
    words = value.split(None, 1)
    return len(words) == 1 or (len(words) == 2 and words[0].lower() == "bearer")


def refuse_wrong_header(settings: Settings, request: Request) -> None:
    """Before a body route reads its body: a Bearer (or raw) key that is sent must be the key. A missing
    header, or one of another scheme, waits for the body's `ai_token`."""
    value = request.headers.get("authorization")
    if settings.api_key and value and claims_a_key(value) and not header_is_valid(settings, request):
        raise ApiError(401, INVALID_KEY, headers={"WWW-Authenticate": "Bearer"})


def require_body_or_header(settings: Settings, request: Request, ai_token: Any) -> None:
    """Body routes (/release_task, /query_result, ...): a truthy body `ai_token` must match even
    when a valid header is also sent; otherwise the header decides."""
    if not settings.api_key:
        return
    if ai_token:
        if not isinstance(ai_token, str) or not _equal(ai_token, settings.api_key):
            raise ApiError(401, INVALID_TOKEN)
        return
    _check_header(settings, request, MISSING_BODY_AUTH)


def _check_header(settings: Settings, request: Request, missing_message: str) -> None:
    """The Authorization header must carry the key; upstream words a missing one per route kind."""
    value = request.headers.get("authorization")
    if not value:
        raise ApiError(401, missing_message, headers={"WWW-Authenticate": "Bearer"})
    if not _equal(bearer_key(value), settings.api_key):
        raise ApiError(401, INVALID_KEY, headers={"WWW-Authenticate": "Bearer"})


def token_from_fields(fields: Optional[dict[str, Any]]) -> Any:
    if not isinstance(fields, dict):
        return None
    return fields.get("ai_token")
