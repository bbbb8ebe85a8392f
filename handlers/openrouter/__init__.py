"""The OpenAI/OpenRouter-compatible music API (upstream's `openrouter` server), on its own listener.

`create_openrouter_app(settings, backend)` builds it on the backend the ACE-Step API uses, so both
share one task store, queue and set of workers. Its submits take /release_task's path
(service/submitter.py): the task cost ceiling, the per-caller task limits and the per-caller request
rate apply alike; given the ACE-Step app's `rate_buckets` and `submitter`, a caller's requests to
either API count together (and given its `body_budget`, the bodies of both: handlers/body_budget.py).
"""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.config import Settings
from service.ports import Backend
from service.submitter import Submitter
from service.webhooks.delivery import WebhookNotifier

from ..body_budget import BodyBudget, BodyBudgetMiddleware
from ..cors import cors_origins
from ..envelope import install_error_handlers
from ..rate_limit import RateLimitMiddleware, TokenBuckets
from ..request_context import RequestContextMiddleware
from service.task_payload import build_notifier
from . import routes
from .auth import required_key

DESCRIPTION = """OpenAI Chat Completions-compatible music generation (upstream's OpenRouter API).
POST /v1/chat/completions with `messages`; the audio comes back as base64 data URLs in
`choices[0].message.audio`. `stream: true` sends Server-Sent Events."""


def create_openrouter_app(settings: Settings, backend: Backend, poll_seconds: float | None = None, *,
                          rate_buckets: Optional[TokenBuckets] = None,
                          body_budget: Optional[BodyBudget] = None,
                          submitter: Optional[Submitter] = None,
                          webhooks: Optional[WebhookNotifier] = None) -> FastAPI:
    app = FastAPI(title="ACE-Step OpenAI-compatible API", version="1.0", description=DESCRIPTION,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.backend = backend
    app.state.poll_seconds = poll_seconds  # None: per backend (waiting.POLL_SECONDS)
    app.state.chat_key = required_key
    app.state.webhooks = webhooks if webhooks is not None else build_notifier(settings, backend)
    app.state.submitter = submitter if submitter is not None else Submitter(settings, backend)
    install_error_handlers(app)
    app.include_router(routes.chat_router)
    app.include_router(routes.router)
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Task-ID", "X-Request-ID"],
                           allow_credentials="*" not in origins)
    if rate_buckets is None:
        rate_buckets = TokenBuckets.configured(settings.rate_limit_rps)
    if rate_buckets is not None:
        app.add_middleware(RateLimitMiddleware, buckets=rate_buckets)
    app.add_middleware(BodyBudgetMiddleware, budget=body_budget or BodyBudget.for_settings(settings))
    app.add_middleware(RequestContextMiddleware)
    return app


__all__ = ["create_openrouter_app"]
