"""Who is calling: the identity per-caller limits count by (service/caller_limits.py)."""
from __future__ import annotations

from typing import Optional

from fastapi import Request

from service.caller_limits import caller_id


def credential(request: Request, fields: Optional[dict] = None) -> Optional[str]:
    """The API key the request presents (body `ai_token`, else the Authorization header), if any."""
    token = (fields or {}).get("ai_token")
    if isinstance(token, str) and token:
        return token
    header = request.headers.get("authorization", "").strip()
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    return header or None


def caller_of(request: Request, fields: Optional[dict] = None) -> str:
    return caller_id(credential(request, fields), request.client.host if request.client else None)
