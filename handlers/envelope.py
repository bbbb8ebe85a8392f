"""The response wrapper `{data, code, error, timestamp, extra}` and the error handlers.

Successful JSON responses are wrapped; errors are an HTTP status with `{"detail": "..."}` (the
upstream convention). The handlers installed here make sure that nothing a client sends turns
into a 500: malformed bodies are 400, oversized ones 413, and so on.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, TypeAlias

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.ports import IdempotencyConflict
from service.refusals import Refused

log = logging.getLogger("acestep.api")


# What a route returns for FastAPI to serialise (jsonable_encoder): `data` and `extra` hold JSON, models or
# dataclasses. Such routes say response_model=None: their documented bodies are in `responses` (openapi_responses).
Enveloped: TypeAlias = dict[str, Any]


def wrap(data: Any, *, code: int = 200, error: Optional[str] = None, extra: Any = None) -> Enveloped:
    """The upstream success envelope; `timestamp` is in milliseconds."""
    return {"data": data, "code": code, "error": error, "timestamp": int(time.time() * 1000), "extra": extra}


class ApiError(HTTPException):
    """An error shown to the client as `HTTP <status> {"detail": message}`."""

    def __init__(self, status_code: int, detail: str, headers: Optional[dict[str, Any]] = None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)


def bad_request(detail: str) -> ApiError:
    return ApiError(400, detail)


def not_found(detail: str) -> ApiError:
    return ApiError(404, detail)


def forbidden(detail: str) -> ApiError:
    return ApiError(403, detail)


def too_large(limit_bytes: int, what: str = "Request body") -> ApiError:
    return ApiError(413, f"{what} too large: the limit is {limit_bytes // (1024 * 1024)} MB")


def refusal_response(exc: Refused) -> JSONResponse:
    """The one mapping of a service refusal to HTTP: its status, its detail, its Retry-After."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if exc.detail is not None else ""
        return JSONResponse({"detail": detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own parameter validation (e.g. /v1/audio without `path`): keep its 422 shape,
        # but make sure the body is JSON-serialisable whatever the input was.
        errors = []
        for err in exc.errors():
            errors.append({"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")),
                           "type": str(err.get("type", ""))})
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Refused)  # the service would not take the task (or a write): queue full, storage full...
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return refusal_response(exc)

    @app.exception_handler(IdempotencyConflict)
    async def _idempotency_conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        # 422 as the IETF Idempotency-Key draft: the key is known but the request is not the same
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - server bugs only
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal server error"}, status_code=500)
