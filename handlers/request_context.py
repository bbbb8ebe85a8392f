"""Every request gets an id, on its log lines and in its `X-Request-ID` response header.

The id is the client's `X-Request-ID` when it sends a sane one, else API Gateway's request id on
Lambda (so a line can be found from either side), else a fresh one. One access line per request
replaces uvicorn's, which is written outside the request's log context.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.observability.logs import log_context

log = logging.getLogger(__name__)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _SANE_ID.fullmatch(candidate):
                return candidate
    event = scope.get("aws.event")  # set by Mangum on Lambda
    if isinstance(event, dict):
        aws_id = (event.get("requestContext") or {}).get("requestId")
        if isinstance(aws_id, str) and _SANE_ID.fullmatch(aws_id):
            return aws_id
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        started = time.perf_counter()
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info("%s %s %d %.1fms", scope.get("method"), scope.get("path"), status[0],
                         (time.perf_counter() - started) * 1000,
                         extra={"method": scope.get("method"), "path": scope.get("path"), "status": status[0]})
