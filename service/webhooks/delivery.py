"""Delivering finished tasks' results to their webhook_url from the task store's outbox: signed,
retried, at least once, several at a time, off the caller's thread.

The write that ends a task with a webhook_url puts its webhook in the outbox (TaskStore.webhooks_due),
so a process that stops (or dies) with deliveries pending loses none: any notifier on the backend,
this process's next start included, takes them up. Each attempt is claimed in the store first (one
process per attempt; a claim whose process dies lapses after `lease` s and the entry is retried).

`task_finished(task_id)` only wakes the dispatcher (it never blocks, never raises); without it the
outbox is read every `poll_seconds` anyway. The dispatcher hands up to `concurrency` attempts to a
pool of threads, each bounded by `timeout` s in all (sender.post), so a slow receiver holds one slot
for at most that long and never delays the others. A non-2xx answer or a network error is retried
with exponential backoff (`attempts` tries in all, ACESTEP_WEBHOOK_ATTEMPTS).

Each POST carries the task's /query_result entry (the `payload` function the entry point wires in),
the Standard Webhooks headers (signature.py: `webhook-id` is the same for every attempt at one
task's outcome, so receivers drop repeats by it) and X-ACEStep-Event / -Task-ID / -Delivery-Attempt.
The body is built once per process and resent as is; after a restart it is built again (its signed
file URLs carry new expiry times, the id stays the same).
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

from ..ports import TaskStore, WebhookDue
from ..records import TaskRecord
from ..signing_keys import SigningKeys, ephemeral_keys
from .sender import post
from .signature import signed_headers, webhook_id
from .targets import Target, WebhookRefused, check_target, resolve_within

log = logging.getLogger(__name__)

EVENT = "task.finished"
Sender = Callable[[Target, bytes, dict[str, str], float], int]
_FAR = 10 ** 11  # a unix time past any due time: "everything in the outbox"
_BODIES_KEPT = 256


class WebhookNotifier:
    def __init__(self, store: TaskStore, payload: Callable[[TaskRecord], dict[str, Any]], *,
                 keys: Optional[Callable[[], SigningKeys]] = None, allow_private: bool, attempts: int = 5,
                 backoff: float = 2.0, timeout: float = 10.0, concurrency: int = 8, poll_seconds: float = 5.0,
                 sender: Sender = post):
        self.store, self.payload = store, payload
        self.keys = keys or ephemeral_keys()
        self.allow_private, self.attempts, self.backoff, self.timeout = allow_private, attempts, backoff, timeout
        self.poll_seconds, self.sender = poll_seconds, sender
        self.concurrency = concurrency
        self.lease_seconds: Optional[float] = None  # None: timeout + 30 s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")
        self._bodies: OrderedDict[str, bytes] = OrderedDict()  # webhook-id -> body, resent as is on a retry
        self._in_flight = 0
        self._wake_at = 0.0  # monotonic: when the dispatcher reads the outbox next
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._persistent = False  # start() was called: never stop reading the outbox
        self._nudged = False  # task_finished since the dispatcher last read the outbox

    @property
    def lease(self) -> float:
        """How long a claimed attempt stays hidden from other processes: its own time and then some."""
        return self.lease_seconds if self.lease_seconds is not None else self.timeout + 30.0

    # -- the caller's side -----------------------------------------------------------------------

    def start(self) -> None:
        """Read the outbox from now on, for good (a worker does at boot, so deliveries pending from
        before resume at once)."""
        with self._cond:
            self._persistent = True
        self._ensure_thread()

    def task_finished(self, task_id: str) -> None:
        """A task ended here: read the outbox now (never blocks, never raises). Without start(), the
        dispatcher this starts stops again once the outbox is empty (an API process: workers keep reading)."""
        with self._cond:
            self._wake_at = 0.0
            self._nudged = True
            self._cond.notify_all()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
                self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight (tests); False if something is still pending."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                idle = self._in_flight == 0
            if idle and not self.store.webhooks_due(_FAR, 1):
                return True
            if time.monotonic() >= deadline:
                log.warning("webhook deliveries still pending after %.0f s", timeout)
                return False
            self._ensure_thread()
            with self._cond:
                self._wake_at, self._nudged = 0.0, True
                self._cond.notify_all()
                self._cond.wait(0.05)

    def close(self, timeout: float) -> bool:
        """Stop taking deliveries and wait up to `timeout` s for those in flight; the rest stay in the outbox."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d webhook attempt(s) still running at shutdown: retried by the next "
                                "process once their claim lapses", self._in_flight)
                    return False
                self._cond.wait(min(left, 0.05))
        self._pool.shutdown(wait=False)
        return True

    # -- the dispatcher ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._in_flight >= self.concurrency
                                               or time.monotonic() < self._wake_at):
                    timeout = None if self._in_flight >= self.concurrency else self._wake_at - time.monotonic()
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                free = self.concurrency - self._in_flight
                self._wake_at = time.monotonic() + self.poll_seconds
                self._nudged = False
            try:
                started = self._dispatch(free)
                idle = started == 0 and not self._persistent and not self.store.webhooks_due(_FAR, 1)
            except Exception:  # the store may be unreachable for a while: try again at the next poll
                log.warning("could not read the webhook outbox", exc_info=True)
                continue
            with self._cond:
                if started == free:  # there may be more due than there were free slots
                    self._wake_at = 0.0
                if idle and not self._in_flight and not self._nudged and not self._persistent:
                    self._thread = None  # nothing left to send: a later task_finished starts another
                    return

    def _dispatch(self, free: int) -> int:
        started = 0
        for due in self.store.webhooks_due(time.time(), free):
            lease_until = round(time.time() + self.lease, 3)
            if not self.store.claim_webhook(due, lease_until):
                continue  # another process took it
            with self._cond:
                self._in_flight += 1
            try:
                self._pool.submit(self._attempt_and_settle, due, lease_until)
            except RuntimeError:  # the pool is shut down (closing): the claim lapses, the next process retries
                with self._cond:
                    self._in_flight -= 1
                return started
            started += 1
        return started

    def _attempt_and_settle(self, due: WebhookDue, lease_until: float) -> None:
        retry_at: Optional[float] = None
        try:
            retry_in = self._attempt(due)
            retry_at = None if retry_in is None else time.time() + retry_in
            if not self.store.settle_webhook(due.task_id, lease_until, retry_at):
                log.warning("webhook of task %s: the claim lapsed during the attempt; another process retries it",
                            due.task_id)
        except Exception:  # a bug or a store error here must not take the dispatcher down
            log.exception("webhook delivery of %s failed; retried when its claim lapses", due.task_id)
        finally:
            with self._cond:
                self._in_flight -= 1
                if retry_at is not None:
                    self._wake_at = min(self._wake_at, time.monotonic() + max(0.0, retry_at - time.time()))
                self._cond.notify_all()

    def _attempt(self, due: WebhookDue) -> Optional[float]:
        """One POST; the seconds until the next try, or None when done (delivered, refused or given up)."""
        attempt = due.attempts + 1  # the claim counted this one
        record = self.store.get(due.task_id)
        if record is None or not record.webhook_url:
            return None  # expired meanwhile: nothing left to tell
        msg_id = webhook_id(record.task_id, record.status)
        started = time.monotonic()
        try:
            body = self._body(msg_id, record)
            target = check_target(record.webhook_url, self.allow_private,
                                  resolver=resolve_within(self.timeout))
            headers = {"Content-Type": "application/json", "User-Agent": "acestep-serve-webhook",
                       "X-ACEStep-Event": EVENT, "X-ACEStep-Task-ID": record.task_id,
                       "X-ACEStep-Delivery-Attempt": str(attempt),
                       **signed_headers(self.keys(), msg_id, int(time.time()), body)}
            left = max(0.1, self.timeout - (time.monotonic() - started))
            status = self.sender(target, body, headers, left)
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except WebhookRefused as exc:
            log.warning("webhook of task %s not sent: %s", record.task_id, exc)
            return None
        except (OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            log.info("webhook of task %s delivered (attempt %d)", record.task_id, attempt)
            self._forget_body(msg_id)
            return None
        if attempt >= self.attempts:
            log.warning("webhook of task %s failed %d times, giving up: %s", record.task_id, attempt, problem)
            self._forget_body(msg_id)
            return None
        delay = self.backoff * 2.0 ** (attempt - 1)
        log.info("webhook of task %s failed (%s); retrying in %.1f s", record.task_id, problem, delay)
        return delay

    def _forget_body(self, msg_id: str) -> None:
        with self._cond:
            self._bodies.pop(msg_id, None)

    def _body(self, msg_id: str, record: TaskRecord) -> bytes:
        with self._cond:
            body = self._bodies.get(msg_id)
        if body is None:
            body = json.dumps({"event": EVENT, "status_text": record.status, **self.payload(record)},
                              ensure_ascii=False).encode()
            with self._cond:
                self._bodies[msg_id] = body
                while len(self._bodies) > _BODIES_KEPT:
                    self._bodies.popitem(last=False)
        return body


__all__ = ["EVENT", "WebhookNotifier"]
