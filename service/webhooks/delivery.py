"""Delivering a finished task's result to its webhook_url: signed, retried, off the caller's thread.

`WebhookNotifier.task_finished(task_id)` returns at once; a daemon thread reads the task, builds the
body (the task's /query_result entry, from the `payload` function the entry point wires in) and
POSTs it with `X-ACEStep-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">` keyed with
ACESTEP_API_KEY (no signature when the server has no key). A non-2xx answer or a network error is
retried with exponential backoff (ACESTEP_WEBHOOK_ATTEMPTS tries). Redirects are not followed.
Each task's webhook is sent once per process; deliveries still pending when a process exits are
lost (logged), the result itself stays in the store.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..ports import TaskStore
from ..records import TaskRecord
from .targets import Target, WebhookRefused, check_target

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-ACEStep-Signature"
EVENT = "task.finished"


def signature(key: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the vetted address, with the certificate checked for the URL's host name."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = target.address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """One POST; the HTTP status (redirects are answers, not followed)."""
    conn: http.client.HTTPConnection = (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, timeout)
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


@dataclass(order=True)
class _Due:
    at: float
    task_id: str = field(compare=False)
    attempt: int = field(compare=False, default=0)
    body: Optional[bytes] = field(compare=False, default=None)
    url: Optional[str] = field(compare=False, default=None)


class WebhookNotifier:
    def __init__(self, store: TaskStore, payload: Callable[[TaskRecord], dict], *, key: str,
                 allow_private: bool, attempts: int = 5, backoff: float = 2.0, timeout: float = 10.0,
                 sender: Callable[[Target, bytes, dict[str, str], float], int] = post):
        self.store, self.payload, self.key = store, payload, key
        self.allow_private, self.attempts, self.backoff, self.timeout = allow_private, attempts, backoff, timeout
        self.sender = sender
        self._due: list[_Due] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def task_finished(self, task_id: str) -> None:
        """Queue the task's webhook, if it has one (never blocks, never raises)."""
        with self._cond:
            heapq.heappush(self._due, _Due(time.monotonic(), task_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is pending (tests, shutdown); False if some delivery is still queued."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._due or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d webhook delivery(ies) still pending", len(self._due) + self._busy)
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0].at > time.monotonic():
                    self._cond.wait(None if not self._due else max(0.0, self._due[0].at - time.monotonic()))
                item = heapq.heappop(self._due)
                self._busy += 1
            try:
                retry = self._attempt(item)
            except Exception:  # a bug here must not kill the thread that serves every other task
                log.exception("webhook delivery of %s failed", item.task_id)
                retry = None
            with self._cond:
                self._busy -= 1
                if retry is not None:
                    heapq.heappush(self._due, retry)
                self._cond.notify_all()

    def _attempt(self, item: _Due) -> Optional[_Due]:
        if item.body is None:  # first attempt: what to send, read once
            record = self.store.get(item.task_id)
            if record is None or not record.webhook_url:
                return None
            item.url = record.webhook_url
            item.body = json.dumps({"event": EVENT, "status_text": record.status, **self.payload(record)},
                                   ensure_ascii=False).encode()
        assert item.url is not None
        headers = {"Content-Type": "application/json", "User-Agent": "acestep-serve-webhook",
                   "X-ACEStep-Event": EVENT, "X-ACEStep-Task-ID": item.task_id,
                   "X-ACEStep-Delivery-Attempt": str(item.attempt + 1)}
        if self.key:
            headers[SIGNATURE_HEADER] = signature(self.key, int(time.time()), item.body)
        try:
            target = check_target(item.url, self.allow_private)
            status = self.sender(target, item.body, headers, self.timeout)
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except WebhookRefused as exc:
            log.warning("webhook of task %s not sent: %s", item.task_id, exc)
            return None
        except (OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            log.info("webhook of task %s delivered (attempt %d)", item.task_id, item.attempt + 1)
            return None
        if item.attempt + 1 >= self.attempts:
            log.warning("webhook of task %s failed %d times, giving up: %s", item.task_id, self.attempts, problem)
            return None
        delay = self.backoff * 2 ** item.attempt
        log.info("webhook of task %s failed (%s); retrying in %.1f s", item.task_id, problem, delay)
        return _Due(time.monotonic() + delay, item.task_id, item.attempt + 1, item.body, item.url)


__all__ = ["EVENT", "SIGNATURE_HEADER", "WebhookNotifier", "post", "signature"]
