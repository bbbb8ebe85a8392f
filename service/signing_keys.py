"""The secret behind signed URLs (`/v1/audio`, uploads, /docs): random, stored by the service, rotatable.

Never derived from the API key: signed audio URLs are meant to be shared, and an HMAC keyed with
the API key lets anyone holding one URL test API-key guesses offline. The adapters keep the
secret: embedded in a 0600 file in the data dir (service/embedded/signing_secret.py), AWS in a
Secrets Manager secret the stack creates (service/aws/signing_secret.py). After a rotation the
previous secret is still accepted for a grace window, so URLs already handed out keep working.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

SECRET_BYTES = 32


@dataclass(frozen=True)
class SigningKeys:
    current: bytes  # signs new URLs
    previous: tuple[bytes, ...] = ()  # still accepted (grace window after a rotation)

    @property
    def accepted(self) -> tuple[bytes, ...]:
        return (self.current, *self.previous)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


class CachedKeys:
    """Loads the keys once, then again at most every `refresh_seconds`, so every API process picks up
    a rotation within that time without a storage read per request."""

    def __init__(self, load: Callable[[], SigningKeys], refresh_seconds: float = 60.0):
        self._load, self._refresh = load, refresh_seconds
        self._lock = threading.Lock()
        self._keys: SigningKeys | None = None
        self._at = 0.0

    def __call__(self) -> SigningKeys:
        with self._lock:
            if self._keys is None or time.monotonic() - self._at > self._refresh:
                self._keys, self._at = self._load(), time.monotonic()
            return self._keys


def ephemeral_keys() -> Callable[[], SigningKeys]:
    """A secret for this process only (a backend that stores none, e.g. a test double)."""
    keys = SigningKeys(new_secret())
    return lambda: keys
