"""Bearer-key auth of the OpenAI-compatible API: OPENROUTER_API_KEY, else ACESTEP_API_KEY.

Falling back to the ACE-Step key keeps a second listener on the same task store from being an
open door when only the main API was given a key. No key at all: no auth (as upstream).
"""
from __future__ import annotations

import hmac

from fastapi import Request

from service.config import Settings

from ..envelope import ApiError


def required_key(settings: Settings) -> str:
    return settings.openrouter_api_key or settings.api_key


def require_key(settings: Settings, request: Request) -> None:
    key = required_key(settings)
    if not key:
        return
    value = (request.headers.get("authorization") or "").strip()
    if not value:
        raise ApiError(401, "Missing Authorization header", headers={"WWW-Authenticate": "Bearer"})
    given = value[7:].strip() if value.lower().startswith("bearer ") else value
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")):
        raise ApiError(401, "Invalid API key", headers={"WWW-Authenticate": "Bearer"})
