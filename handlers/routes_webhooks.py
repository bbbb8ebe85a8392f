"""GET /v1/webhook_secret: the secret webhook receivers verify signatures with (Standard Webhooks)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.webhooks import secret_text

from .auth import require_header
from .deps import backend_of, settings_of
from .envelope import ApiError, Enveloped, wrap
from .openapi_bodies import error_responses
from .openapi_responses import Envelope, ok

router = APIRouter(tags=["webhooks"])


class WebhookSecret(BaseModel):
    secret: str  # whsec_<base64>: what Standard Webhooks libraries take
    previous: list[str]  # still signing during a rotation's grace window
    scheme: str
    signature_header: str


@router.get("/v1/webhook_secret", response_model=None, summary="The secret webhook signatures are keyed with",
            responses={**ok(Envelope[WebhookSecret]), **error_responses(401, 503)})
async def webhook_secret(request: Request) -> Enveloped:
    """The server's webhook-signing secret (never the API key), for receivers' Standard Webhooks
    libraries: `Webhook(secret).verify(body, headers)`. Each delivery is signed with this secret and,
    for a while after a rotation, with the previous one too. Needs the API key (ACESTEP_API_KEY)."""
    require_header(settings_of(request), request)
    keys_of = backend_of(request).webhook_keys  # set by build_notifier when the backend stores none
    if keys_of is None:
        raise ApiError(503, "this server has no webhook secret (ACESTEP_WEBHOOK_SECRET_ARN is not set)")
    keys = await run_in_threadpool(keys_of)
    secret = WebhookSecret(secret=secret_text(keys.current), previous=[secret_text(k) for k in keys.previous],
                           scheme="standard-webhooks v1", signature_header="webhook-signature")
    return wrap(secret.model_dump())


__all__ = ["router"]
