"""Lambda SnapStart for the API function: what runs before the snapshot and after each restore.

With SnapStart, Lambda runs the init phase once per published version and snapshots the memory; a
cold start then restores that snapshot instead of importing and building the app again. So the
init phase should leave as much done as it can (every lazy import, validator and AWS service model
loaded), and a restore must undo what may not be shared between the copies of one snapshot:
  - open connections and AWS credentials, which belong to the environment that took the snapshot;
  - the state of `random`, which every restored copy would otherwise replay identically.

The hooks are registered through `snapshot_restore_py`, which Lambda's Python runtimes ship; where
it is absent (local runs, the container image, which SnapStart does not support) nothing is done.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any, Callable, Optional

from entrypoints import heap
from service.aws.clients import build_all, forget_sessions  # boto3 itself is imported only when used

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

# Requests replayed through the handler before the snapshot: they pull in the lazy imports and
# build the validators of the paths clients hit first. None of them can create anything: the
# submit is refused by validation (a non-numeric duration) before any write.
PRIMING_REQUESTS: tuple[tuple[str, str, Optional[dict[str, Any]]], ...] = (
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("POST", "/release_task", {"prompt": "priming", "audio_duration": "not a number"}),
    ("POST", "/query_result", {"task_id_list": []}),
    ("GET", "/openrouter/health", None),
)


def api_gateway_event(method: str, path: str, body: Optional[dict[str, Any]], api_key: str = "") -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event, as the function receives it."""
    headers = {"host": "snapstart.invalid", "content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
        "headers": headers,
        "requestContext": {"http": {"method": method, "path": path, "sourceIp": "127.0.0.1",
                                    "protocol": "HTTP/1.1", "userAgent": "snapstart-priming"},
                           "domainName": "snapstart.invalid", "requestId": "snapstart-priming",
                           "stage": "$default", "accountId": "-", "apiId": "-", "time": "-", "timeEpoch": 0},
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


def prime(handler: Handler, api_key: str) -> dict[str, int]:
    """Replay PRIMING_REQUESTS through `handler`; returns each path's status. Never raises: a failed
    priming leaves a slower first request, not a function that cannot start."""
    statuses: dict[str, int] = {}
    for method, path, body in PRIMING_REQUESTS:
        try:
            statuses[path] = int(handler(api_gateway_event(method, path, body, api_key), None)["statusCode"])
        except Exception as exc:  # noqa: BLE001 - priming is an optimisation only
            log.warning("SnapStart priming of %s %s failed: %s", method, path, exc)
            statuses[path] = -1
    return statuses


def after_restore() -> None:
    """Make this copy of the snapshot its own: fresh randomness, fresh AWS sessions and sockets."""
    random.seed(os.urandom(32))
    forget_sessions()


def install(handler: Handler, api_key: str) -> bool:
    """Register the hooks with the runtime; False where there is no SnapStart runtime."""
    try:
        from snapshot_restore_py import register_after_restore, register_before_snapshot
    except ImportError:
        return False
    def before_snapshot() -> None:
        started = time.perf_counter()
        statuses = prime(handler, api_key)
        # Every AWS client the app made, built now: botocore's service models are parsed into the
        # session's cache, so a restored copy creates its clients from memory.
        build_all()
        heap.settle()  # what init and priming built is long-lived in every restored copy
        log.info("SnapStart priming done in %.0f ms: %s", 1000 * (time.perf_counter() - started), statuses)

    register_before_snapshot(before_snapshot)
    register_after_restore(after_restore)
    return True
