"""The FastAPI application factory: `create_app(settings, backend)`.

The entry points (entrypoints.bootstrap) build the backend and pass it in; this package never
chooses or constructs adapters itself.
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.fleet import served_model_names
from service.ports import Backend
from service.submitter import Submitter
from service.version import __version__

from . import routes_audio, routes_cancel, routes_info, routes_lm, routes_studio, routes_tasks, routes_webhooks
from . import routes_adapters, routes_models
from .auth import header_is_valid, require_header
from .body_budget import BodyBudget, BodyBudgetMiddleware
from .cors import cors_origins
from .envelope import install_error_handlers
from .lm_gateway import LMGateway
from .openrouter.auth import acestep_key
from .openrouter.routes import chat_router
from .openapi_bodies import with_model_names, with_rate_limit_answers
from .rate_limit import COUNTED_METHODS, EXEMPT, RateLimitMiddleware, TokenBuckets
from .request_context import RequestContextMiddleware
from .results import QueryResults
from service.signed_urls import KeySource, openapi_url, url_keys, verify
from service.task_payload import build_notifier

DESCRIPTION = """ACE-Step 1.5 music generation: the ACE-Step REST API (compatible with upstream
`acestep-api`). Submit with POST /release_task, poll POST /query_result, download the `file` URL.
When an API key is set, send `Authorization: Bearer <key>` (or `ai_token` in the body)."""


def _install_docs(app: FastAPI, settings: Settings, keys: KeySource) -> None:
    """/docs and /openapi.json, behind the API key like every other route but /health.

    The Swagger page loads the schema through a short-lived signed URL, so a browser that
    opened /docs with the key does not need to send it again."""

    generate = app.openapi
    listed: list[list[str]] = []  # the model names the schema's `model` lists now

    def openapi_of_this_server() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once
            generate()
            if settings.rate_limit_rps > 0:
                with_rate_limit_answers(app.openapi_schema or {}, COUNTED_METHODS, EXEMPT)
        names = served_model_names(settings, app.state.backend)  # changes with POST /v1/init (one machine)
        if listed != [names]:  # `model` lists the models served now
            with_model_names(app.openapi_schema or {}, names)
            listed[:] = [names]
        return app.openapi_schema or generate()

    app.openapi = openapi_of_this_server  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request, expires: Optional[str] = None, sig: Optional[str] = None) -> JSONResponse:
        if not verify(keys, "openapi", "", expires, sig):
            require_header(settings, request)
        return JSONResponse(await run_in_threadpool(app.openapi))  # a store read: off the event loop

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        require_header(settings, request)
        url = openapi_url(keys) if settings.api_key else "/openapi.json"
        return get_swagger_ui_html(openapi_url=url, title=f"{app.title} - docs")


def create_app(settings: Settings, backend: Backend, lm_gateway: Optional[LMGateway] = None,
               submitter: Optional[Submitter] = None) -> FastAPI:
    """Build the API on the given backend (and the LM, when one is reachable from the API). `submitter`:
    the submit use case the routes call (entrypoints.bootstrap builds it; by default one on `backend`)."""
    app = FastAPI(title="ACE-Step API", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.backend = backend
    app.state.lm_gateway = lm_gateway
    app.state.webhooks = build_notifier(settings, backend)  # a cancelled task's webhook (workers send the rest)
    app.state.query_results = QueryResults(settings, backend)  # caches finished entries for the app's life
    app.state.submitter = submitter if submitter is not None else Submitter(settings, backend)
    # The chat completions on this listener too, as upstream's API server serves them (its own limits,
    # this listener's key): handlers/openrouter/routes.py.
    app.state.poll_seconds = None  # the chat's waits poll the store at the backend's pace
    app.state.chat_key = acestep_key
    install_error_handlers(app)
    for module in (routes_tasks, routes_cancel, routes_audio, routes_info, routes_lm, routes_studio, routes_webhooks,
                   routes_adapters, routes_models):
        app.include_router(module.router)
    app.include_router(chat_router)
    _install_docs(app, settings, url_keys(backend))  # signed with the secret the backend stores
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "PUT", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Range"],
                           expose_headers=["Content-Length", "Content-Range", "Accept-Ranges", "X-Request-ID"],
                           allow_credentials="*" not in origins)
    # Shared with the OpenAI-compatible app beside it (handlers/openrouter): one count per caller.
    app.state.rate_buckets = TokenBuckets.configured(settings.rate_limit_rps)
    if app.state.rate_buckets is not None:
        app.add_middleware(RateLimitMiddleware, buckets=app.state.rate_buckets)
    # Request-body bytes in memory at once, shared with the chat app beside it (handlers/body_budget.py)
    app.state.body_budget = BodyBudget.for_settings(settings)
    app.add_middleware(BodyBudgetMiddleware, budget=app.state.body_budget)
    app.add_middleware(RequestContextMiddleware)  # outermost: its id covers everything below
    return app


__all__ = ["cors_origins", "create_app", "header_is_valid"]
