"""Signed, expiring URLs on this API: result audio (`GET /v1/audio`), direct uploads
(`PUT /v1/uploads/<key>`) and the OpenAPI document behind /docs.

A signature is HMAC-SHA256 over `purpose \\n key \\n expires` keyed with the service's random
signing secret (service/signing_keys.py; never the API key, so a shared URL reveals nothing about
it), so a plain `<audio src>` can play a result without sending the API key, and nothing else can
be fetched with it. After a rotation, URLs signed with the previous secret stay valid for the
grace window. URLs carry opaque blob keys, never server paths.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import math
import time
from typing import Callable, Optional
from urllib.parse import quote

from .ports import Backend
from .signing_keys import SigningKeys, ephemeral_keys

KeySource = Callable[[], SigningKeys]

# Expiry is rounded up to this many seconds so a URL stays the same across polls (cacheable).
_ROUND = 300


def url_keys(backend: Backend) -> KeySource:
    """The secret(s) this process signs URLs with: the one the backend stores; a backend that stores none
    gets one for this process, kept on it so every URL this process signs shares it."""
    if backend.signing_keys is None:
        backend.signing_keys = ephemeral_keys()
    return backend.signing_keys


def signature(keys: KeySource, purpose: str, key: str, expires: int) -> str:
    return _hmac(keys().current, purpose, key, expires)


def _hmac(secret: bytes, purpose: str, key: str, expires: int) -> str:
    msg = f"{purpose}\n{key}\n{expires}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def expiry(ttl: int, now: Optional[float] = None) -> int:
    now = time.time() if now is None else now
    return int(math.ceil((now + max(1, int(ttl))) / _ROUND) * _ROUND)


_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def verify(keys: KeySource, purpose: str, key: str, expires: Optional[str], sig: Optional[str],
           now: Optional[float] = None) -> bool:
    if not expires or not sig or len(expires) > 20 or not _HEX_DIGEST.fullmatch(sig):
        return False
    try:
        exp = int(expires)
    except ValueError:
        return False
    if exp < (time.time() if now is None else now):
        return False
    given = sig.lower()
    return any(hmac.compare_digest(_hmac(secret, purpose, key, exp), given)
               for secret in keys().accepted)


def audio_url(keys: KeySource, key: str, ttl: int) -> str:
    """`/v1/audio?path=<url-encoded key>&expires=<unix>&sig=<hmac>` (relative, as upstream)."""
    exp = expiry(ttl)
    return f"/v1/audio?path={quote(key, safe='')}&expires={exp}&sig={signature(keys, 'audio', key, exp)}"


def upload_url(keys: KeySource, key: str, ttl: int) -> str:
    exp = int(time.time()) + ttl
    return f"/v1/uploads/{quote(key, safe='/')}?expires={exp}&sig={signature(keys, 'upload', key, exp)}"


def openapi_url(keys: KeySource, ttl: int = 600) -> str:
    exp = expiry(ttl)
    return f"/openapi.json?expires={exp}&sig={signature(keys, 'openapi', '', exp)}"
