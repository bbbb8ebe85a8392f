"""A process-wide budget for the request-body bytes held in memory at once.

Each body is bounded (handlers/body.py: 2 MB of text, multipart up to 2 x ACESTEP_MAX_UPLOAD_MB, a
chat's base64 audio, an adapter upload), but not how many arrive together: 8 concurrent 60 MB chat
bodies took the API process from 55 MB to 1.25 GB (parsing holds ~3x a body, and only two parse at a
time: handlers/off_loop.py), and a few dozen would take the machine. So the bytes of every body count
against one budget as they arrive, and are given back when the request ends, or earlier when its route
has let go of the body (`release_body`: the chat route, before it waits minutes for its task). A body
that would take the total past the budget is a 503 with Retry-After: at once when its Content-Length
says so, else at the chunk that crosses it. A declared length reserves nothing, so a client that
declares much and sends little holds nobody up.

Both APIs of a process share one budget (the entry points pass the ACE-Step app's to the chat app), and
an app mounted in another (Lambda's /openrouter) counts a body once.
"""
from __future__ import annotations

import threading
from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings

from .envelope import ApiError

HOLD = "acestep.body_hold"  # scope key: this request's bytes, counted by the outermost app
RETRY_AFTER = "5"
BUSY = ("Server busy: request bodies in flight already hold the memory this server gives them "
        "({mb} MB); retry shortly")


def largest_body(settings: Settings) -> int:
    """The largest body any route accepts (handlers/body.py, the chat route, adapter uploads)."""
    return max(2 * settings.max_upload_bytes + 2 * 2**20, settings.max_adapter_bytes)


class BodyBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()  # the Lambda and test clients may call from threads

    @classmethod
    def for_settings(cls, settings: Settings) -> "BodyBudget":
        """Two of the largest bodies at once: any single valid body fits, and so do several uploads."""
        return cls(2 * largest_body(settings))

    @property
    def held(self) -> int:
        return self._held

    def fits(self, n: int) -> bool:
        return self._held + n <= self.limit

    def take(self, n: int) -> bool:
        with self._lock:
            if self._held + n > self.limit:
                return False
            self._held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._held -= n

    def busy(self) -> ApiError:
        return ApiError(503, BUSY.format(mb=self.limit // 2**20), headers={"Retry-After": RETRY_AFTER})


class BodyHold:
    """One request's bytes counted against the budget."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.held = budget, 0

    def add(self, n: int) -> None:
        if not self.budget.take(n):
            raise self.budget.busy()
        self.held += n

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


def release_body(request: Request) -> None:
    """The route no longer holds its body: give its bytes back now instead of when the request ends."""
    hold: Optional[BodyHold] = request.scope.get(HOLD)
    if hold is not None:
        hold.release()


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return 0  # handlers/body.py answers the 400
    return 0


class BodyBudgetMiddleware:
    def __init__(self, app: ASGIApp, budget: BodyBudget):
        self.app, self.budget = app, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or HOLD in scope:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        # Past the whole budget it is past every route's limit too: the route's 413 says so, not a 503
        if declared <= self.budget.limit and not self.budget.fits(declared):
            busy = self.budget.busy()
            await JSONResponse({"detail": busy.detail}, status_code=503, headers=busy.headers)(scope, receive, send)
            return
        hold = scope[HOLD] = BodyHold(self.budget)  # a mounted app's middleware passes it on (Mount copies the scope)

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                hold.add(len(message["body"]))  # a 503 (ApiError) where the route reads it
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            hold.release()


__all__ = ["BodyBudget", "BodyBudgetMiddleware", "largest_body", "release_body"]
