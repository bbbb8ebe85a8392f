"""Bearer-key auth of the chat completions, by the listener a request came in on.

On the chat listener: OPENROUTER_API_KEY, else ACESTEP_API_KEY (falling back to the ACE-Step key keeps
a second listener on the same task store from being an open door when only the main API was given a
key). On the ACE-Step listener: ACESTEP_API_KEY, as for its other header-authenticated routes (upstream
mounts its adapter there without any auth; we do not). No key at all: no auth (as upstream).
"""
from __future__ import annotations

import hmac
from typing import Callable

from fastapi import Request

from service.config import Settings

from ..envelope import ApiError

KeyOf = Callable[[Settings], str]  # the key an app's chat route requires (app.state.chat_key)


def required_key(settings: Settings) -> str:
    """The chat listener's key."""
    return settings.openrouter_api_key or settings.api_key


def acestep_key(settings: Settings) -> str:
    """The ACE-Step listener's key."""
    return settings.api_key


def require_key(settings: Settings, request: Request) -> None:
    key_of: KeyOf = getattr(request.app.state, "chat_key", required_key)
    key = key_of(settings)
    if not key:
        return
    value = (request.headers.get("authorization") or "").strip()
    if not value:
        raise ApiError(401, "Missing Authorization header", headers={"WWW-Authenticate": "Bearer"})
    given = value[7:].strip() if value.lower().startswith("bearer ") else value
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")):
        raise ApiError(401, "Invalid API key", headers={"WWW-Authenticate": "Bearer"})
