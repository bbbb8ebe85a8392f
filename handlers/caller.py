"""Who is calling: the identity that per-caller limits and the request rate count by.

A configured API key in the Authorization header names its holder; every other request is counted
by its peer address. A token the client picks is not an identity: without a configured key any
token is accepted, and a fresh one per request would give each request a fresh set of limits.
The body's `ai_token` authenticates but does not name the caller, because the request rate is
counted before the body is read: rate and task limits then see the same caller for one request.

The address is the TCP peer: on Lambda, API Gateway's `sourceIp` (Mangum puts it in the scope);
behind a proxy, the client it forwards for only when the proxy is in ACESTEP_TRUSTED_PROXIES
(the listener applies X-Forwarded-For from those alone: entrypoints/api_server.py).
"""
from __future__ import annotations

import hmac
from typing import Any, Iterable, Mapping, MutableMapping

from fastapi import Request

from service.caller_limits import Caller

from .auth import bearer_key


def configured_keys(settings: Any) -> tuple[str, ...]:
    """The keys that authenticate on either API (ACESTEP_API_KEY, OPENROUTER_API_KEY)."""
    return tuple(k for k in (getattr(settings, "api_key", ""), getattr(settings, "openrouter_api_key", "")) if k)


def _is_configured(given: str, keys: Iterable[str]) -> bool:
    encoded = given.encode("utf-8", "surrogatepass")
    return any(hmac.compare_digest(encoded, k.encode("utf-8", "surrogatepass")) for k in keys)


CALLER = "acestep.caller"  # scope key: the request's caller, decided by the first to ask (the rate limiter)


def caller_from_scope(scope: MutableMapping[str, Any]) -> Caller:
    """The caller of an ASGI request, from its headers and peer only (no body needed). Decided once per
    request and kept in its scope, so the rate limiter and the submit count the same caller object."""
    caller = scope.get(CALLER)
    if not isinstance(caller, Caller):
        caller = scope[CALLER] = _decide(scope)
    return caller


def _decide(scope: Mapping[str, Any]) -> Caller:
    app = scope.get("app")
    keys = configured_keys(getattr(getattr(app, "state", None), "settings", None))
    if keys:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                given = bearer_key(value.decode("latin-1"))
                if given and _is_configured(given, keys):
                    return Caller.by_key(given)
                break
    client = scope.get("client")
    return Caller.at(client[0] if client else None)


def caller_of(request: Request) -> Caller:
    return caller_from_scope(request.scope)


__all__ = ["CALLER", "Caller", "caller_from_scope", "caller_of", "configured_keys"]
