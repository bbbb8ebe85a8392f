"""Webhook signatures in the Standard Webhooks scheme (standardwebhooks.com), which stock libraries verify.

Each delivery carries `webhook-id` (stable for a task's outcome: a receiver drops a repeat by it),
`webhook-timestamp` (unix seconds of this attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256
of "<id>.<timestamp>.<body>">`, one entry per key in use, space-separated, so a receiver holding
either the new or the previous secret verifies during a rotation.

The key is never an API key (an HMAC of a chosen body keyed with the API key is an offline oracle
for it): it is the backend's own random webhook secret, one per server, stored and rotated like the
URL-signing secret but apart from it (receivers are given this one; the other never leaves the server).
"""
from __future__ import annotations

import base64
import hashlib
import hmac

from ..signing_keys import SigningKeys

SECRET_PREFIX = "whsec_"
ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "webhook-id", "webhook-timestamp", "webhook-signature"


def secret_text(key: bytes) -> str:
    """The form receivers configure (whsec_ + base64 of the key bytes)."""
    return SECRET_PREFIX + base64.b64encode(key).decode()


def key_from_text(text: str) -> bytes:
    """A stored secret as key bytes: whsec_<base64> is decoded, any other string is used as its UTF-8 bytes."""
    if text.startswith(SECRET_PREFIX):
        return base64.b64decode(text[len(SECRET_PREFIX):] + "==")
    return text.encode()


def webhook_id(task_id: str, status: str) -> str:
    return f"msg_{task_id}_{status}"


def sign(keys: SigningKeys, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
                    for key in keys.accepted)


def signed_headers(keys: SigningKeys, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(keys, msg_id, timestamp, body)}


__all__ = ["ID_HEADER", "SECRET_PREFIX", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "key_from_text",
           "secret_text", "sign", "signed_headers", "webhook_id"]
