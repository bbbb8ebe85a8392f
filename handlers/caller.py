"""Who is calling: the identity per-caller limits count by (service/caller_limits.py)."""
from __future__ import annotations

from typing import Optional

from fastapi import Request

from service.caller_limits import caller_id

from .auth import bearer_key, token_from_fields


def credential(request: Request, fields: Optional[dict] = None) -> Optional[str]:
    """The API key the request presents (body `ai_token`, else the Authorization header), if any."""
    token = token_from_fields(fields)
    if isinstance(token, str) and token:
        return token
    return bearer_key(request.headers.get("authorization", "")) or None


def caller_of(request: Request, fields: Optional[dict] = None) -> str:
    return caller_id(credential(request, fields), request.client.host if request.client else None)
