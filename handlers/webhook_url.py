"""A submit's webhook_url, checked on the request path before anything is stored (both APIs)."""
from __future__ import annotations

from typing import Any, Optional

from service.config import Settings
from service.webhooks import WebhookRefused, vet_target

from .envelope import ApiError


async def read_webhook_url(settings: Settings, value: Any) -> Optional[str]:
    """None when absent; the URL when this server will call it; else a 400 that says why (a URL that
    does not parse, a private address, a name that does not resolve within the lookup's time limit)."""
    if value is None or value == "":
        return None
    try:
        await vet_target(value, settings.webhook_allow_private)  # the lookup off the event loop, bounded
    except WebhookRefused as exc:
        raise ApiError(400, str(exc)) from None
    return value


__all__ = ["read_webhook_url"]
