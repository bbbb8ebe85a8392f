"""Requests per second per caller (ACESTEP_RATE_LIMIT_RPS): a token bucket per caller (handlers/caller.py:
a configured API key, else the peer address).

Counts what creates work (POST and PUT: submits, uploads, /format_input, chat completions);
polling (/query_result) and downloads are cheap reads and not counted. In-process: on the embedded
backend that is the whole API; on Lambda each instance counts its own share and the API Gateway
stage throttle (infra/) bounds the total. Over the limit: 429 with Retry-After.

Both APIs of a process share one TokenBuckets (a caller's requests to either count together), and
a request is counted once even where one app is mounted in the other (Lambda's /openrouter).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Optional

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.caller_limits import Caller

from .caller import caller_from_scope

COUNTED_METHODS = ("POST", "PUT")
EXEMPT = ("/health", "/query_result")
MAX_CALLERS = 10000  # buckets kept; the oldest are dropped beyond this
COUNTED = "acestep.rate_counted"  # scope key: an outer app's limiter has counted this request


class TokenBuckets:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._lock = threading.Lock()
        self._buckets: dict[Caller, tuple[float, float]] = {}  # caller -> (tokens, at)

    @classmethod
    def per_second(cls, rate: float) -> "TokenBuckets":
        """`rate` requests per second per caller, in bursts of up to twice that."""
        return cls(rate, max(1.0, 2 * rate))

    @classmethod
    def configured(cls, rate: float) -> "Optional[TokenBuckets]":
        """The buckets for ACESTEP_RATE_LIMIT_RPS `rate`, or None when it is 0 (no limit)."""
        return cls.per_second(rate) if rate > 0 else None

    def take(self, caller: Caller, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds until it could."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[caller] = (tokens - 1 if wait == 0 else tokens, now)
            if len(self._buckets) > MAX_CALLERS:
                self._buckets.pop(next(iter(self._buckets)))
            return wait


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, buckets: TokenBuckets):
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in COUNTED_METHODS \
                or scope.get("path", "") in EXEMPT or scope.get(COUNTED):
            await self.app(scope, receive, send)
            return
        scope[COUNTED] = True  # a mounted app's limiter passes it on (Mount copies the scope)
        wait = self.buckets.take(caller_from_scope(scope))
        if wait > 0:
            response = JSONResponse({"detail": "Too many requests: slow down (ACESTEP_RATE_LIMIT_RPS)"},
                                    status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
