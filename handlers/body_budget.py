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

One client may not hold the whole budget: routes that take the key in the body (`ai_token`) read it
before they can authenticate, so a few slow anonymous bodies (60 s each at most: handlers/body.py) would
otherwise refuse every other caller. Bodies count per caller and address too (`body_share`: the peer
address, behind a proxy the client it forwards for from ACESTEP_TRUSTED_PROXIES only, else the proxy's one
address; a configured key in the Authorization header (handlers/caller.py) is a share of its own at that
address, so one key shared by many clients does not pool them), and a caller that already
holds its share (one largest body: half the budget) gets no more bytes counted (503 with Retry-After,
saying so) until its bodies end; the chunk that crosses the share still counts, so any one valid body
fits. Only bodies are refused: a request that declares and sends none (a GET, a poll) is never a 503
here, whatever its caller holds. A wrong Bearer key is refused before a body is read at all
(handlers/auth.py).

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

from service.caller_limits import Caller

from .caller import caller_from_scope
from .envelope import ApiError

HOLD = "acestep.body_hold"  # scope key: this request's bytes, counted by the outermost app
RETRY_AFTER = "5"
BUSY = ("Server busy: request bodies in flight already hold the memory this server gives them "
        "({mb} MB); retry shortly")
CLIENT_BUSY = ("Server busy for this client: its request bodies in flight already hold its share of the "
               "memory this server gives them ({mb} MB); retry when they have ended")


def largest_body(settings: Settings) -> int:
    """The largest body any route accepts (handlers/body.py, the chat route, adapter uploads)."""
    return max(2 * settings.max_upload_bytes + 2 * 2**20, settings.max_adapter_bytes)


class BodyBudget:
    def __init__(self, limit: int, per_client: Optional[int] = None):
        self.limit = limit
        self.per_client = per_client or limit
        self._held = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()  # the Lambda and test clients may call from threads

    @classmethod
    def for_settings(cls, settings: Settings) -> "BodyBudget":
        """Two of the largest bodies at once: any single valid body fits, and so do several uploads. One client
        holds at most one largest body's worth, so another's always fits beside it."""
        largest = largest_body(settings)
        return cls(2 * largest, per_client=largest)

    @property
    def held(self) -> int:
        return self._held

    def held_by(self, client: str) -> int:
        return self._by_client.get(client, 0)

    def refusal(self, n: int, client: Optional[str] = None) -> Optional[ApiError]:
        """The 503 for `n` more bytes of `client`'s, or None when they may be counted. A client is refused once
        it holds its share, not at the chunk that would cross it (that one body may always finish)."""
        if client is not None and self._by_client.get(client, 0) >= self.per_client:
            return self._busy(CLIENT_BUSY, self.per_client)
        if self._held + n > self.limit:
            return self._busy(BUSY, self.limit)
        return None

    def take(self, n: int, client: Optional[str] = None) -> Optional[ApiError]:
        """Count `n` bytes (of `client`'s); None when counted, else the 503 that refuses them."""
        with self._lock:
            refused = self.refusal(n, client)
            if refused is None:
                self._held += n
                if client is not None:
                    self._by_client[client] = self._by_client.get(client, 0) + n
            return refused

    def give(self, n: int, client: Optional[str] = None) -> None:
        with self._lock:
            self._held -= n
            if client is not None:
                left = self._by_client.get(client, 0) - n
                if left > 0:
                    self._by_client[client] = left
                else:
                    self._by_client.pop(client, None)  # no entry per address that ever sent a body

    def _busy(self, message: str, limit: int) -> ApiError:
        return ApiError(503, message.format(mb=limit // 2**20), headers={"Retry-After": RETRY_AFTER})


class BodyHold:
    """One request's bytes counted against the budget, as its client's."""

    def __init__(self, budget: BodyBudget, client: Optional[str]):
        self.budget, self.client, self.held = budget, client, 0

    def add(self, n: int) -> None:
        refused = self.budget.take(n, self.client)
        if refused is not None:
            raise refused
        self.held += n

    def release(self) -> None:
        self.budget.give(self.held, self.client)
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


def body_share(scope: Scope) -> str:
    """Whose share a request's body counts against: its address (forwarded-for only from trusted proxies:
    uvicorn applies it), and apart from that a valid key's holder there. A deployment usually has one key
    for all its clients, so the key alone would pool every keyed client into one share; the address alone
    would let slow anonymous bodies refuse the key's holder behind the same proxy address."""
    caller = caller_from_scope(scope)
    client = scope.get("client")
    address = Caller.at(client[0] if client else None)
    return address.id if caller == address else f"{caller.id}@{address.id}"


class BodyBudgetMiddleware:
    def __init__(self, app: ASGIApp, budget: BodyBudget):
        self.app, self.budget = app, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or HOLD in scope:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        client = body_share(scope)
        # Refused at the door only for a declared body (a GET declares none): past a caller's share it is
        # past every route's limit too, and the route's 413 says so, not a 503
        busy = self.budget.refusal(declared, client) if 0 < declared <= self.budget.per_client else None
        if busy is not None:
            await JSONResponse({"detail": busy.detail}, status_code=503, headers=busy.headers)(scope, receive, send)
            return
        hold = scope[HOLD] = BodyHold(self.budget, client)  # a mounted app's middleware passes it on (Mount copies the scope)

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                hold.add(len(message["body"]))  # a 503 (ApiError) where the route reads it
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            hold.release()


__all__ = ["BodyBudget", "BodyBudgetMiddleware", "body_share", "largest_body", "release_body"]
