"""A stand-in for the ECS container agent's task scale-in protection endpoint.

The agent serves `$ECS_AGENT_URI/task-protection/v1/state` to each container (ECS_AGENT_URI is
`http://169.254.170.2/api/<endpoint id>`); it is not an AWS API, so moto has none. This server
answers as AWS documents it and as the agent's handler does
(amazon-ecs-agent: ecs-agent/tmds/handlers/taskprotection/v1):

- PUT {"ProtectionEnabled": bool, "ExpiresInMinutes"?: int} sets protection (default expiry 120
  minutes, 1..2880 allowed); GET reads it. Both answer 200 {"protection": {"ExpirationDate",
  "ProtectionEnabled", "TaskArn"}}; ExpirationDate is RFC 3339, null when not protected.
- ECS's refusal of the task: 200 {"failure": {"Arn", "Detail", "Reason"}}.
- An error (bad request, ECS raising): 4xx/5xx {"requestID"?, "error": {"Arn"?, "Code", "Message"}}.
- An endpoint id the agent does not know: 404 ResourceNotFoundException; another method: 405.
"""
from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union

STATE_PATH = "/task-protection/v1/state"
DEFAULT_MINUTES, MAX_MINUTES = 120, 2880


@dataclass(frozen=True)
class EcsFailure:
    """ECS answered the call with a failure for the task (e.g. TASK_NOT_VALID): the agent says 200."""
    reason: str
    detail: Optional[str] = None


@dataclass(frozen=True)
class EcsError:
    """The ECS call raised: the agent passes on ECS's status and error code, with the request id."""
    status: int
    code: str
    message: str
    request_id: Optional[str] = "0f1e2d3c-test-request"  # None: the call never reached ECS (timeout)


@dataclass(frozen=True)
class AgentRequest:
    method: str
    endpoint_id: str
    body: Optional[dict[str, Any]]  # PUT only


@dataclass
class _Protection:
    enabled: bool = False
    expires: Optional[dt.datetime] = None


class EcsAgent:
    """The agent of one cluster, serving any number of tasks, each through its own ECS_AGENT_URI
    (`uri_for`). `answer` scripts what ECS says to the calls that reach it; `on_ecs_call` sees each
    ECS API call (Update/GetTaskProtection) the agent makes on the task's behalf, with the task
    role's credentials."""

    def __init__(self, cluster: str = "default", region: str = "us-east-1", account: str = "123456789012",
                 on_ecs_call: Optional[Callable[[str, dict[str, Any]], None]] = None):
        self.cluster, self.region, self.account = cluster, region, account
        self.on_ecs_call = on_ecs_call
        self.answer: Union[EcsFailure, EcsError, None] = None  # None: ECS succeeds
        self.requests: list[AgentRequest] = []
        self._tasks: dict[str, _Protection] = {}  # by endpoint id
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll: shutdown() waits for it, once per test.
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def __enter__(self) -> "EcsAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def uri_for(self, task_id: str) -> str:
        """The ECS_AGENT_URI the agent gives the containers of task `task_id`."""
        with self._lock:
            self._tasks.setdefault(task_id, _Protection())
        return f"{self.base}/api/{task_id}"

    def task_arn(self, task_id: str) -> str:
        return f"arn:aws:ecs:{self.region}:{self.account}:task/{self.cluster}/{task_id}"

    def states(self, task_id: Optional[str] = None) -> list[bool]:
        """ProtectionEnabled of each PUT (of one task's, when given), in order."""
        return [r.body["ProtectionEnabled"] for r in self.requests
                if r.method == "PUT" and r.body and (task_id is None or r.endpoint_id == task_id)]

    # -- the endpoint ----------------------------------------------------------------------------

    def _respond(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        parts = path.split("/", 3)  # "", "api", <endpoint id>, rest
        if len(parts) != 4 or parts[1] != "api" or "/" + parts[3] != STATE_PATH:
            return 404, None
        endpoint_id = parts[2]
        if method not in ("GET", "PUT"):
            return 405, None
        body: Optional[dict[str, Any]] = None
        if method == "PUT":
            body = _decode(raw)
            if body is None:  # the agent decodes before it looks up the task: no Arn yet
                return 400, _error(None, "InvalidParameterException", "UpdateTaskProtection: failed to decode request")
        with self._lock:
            self.requests.append(AgentRequest(method, endpoint_id, body))
            task = self._tasks.get(endpoint_id)
        if task is None:
            return 404, _error(None, "ResourceNotFoundException", "Failed to find a task for the request")
        arn = self.task_arn(endpoint_id)
        if body is not None and "ProtectionEnabled" not in body:
            return 400, _error(arn, "InvalidParameterException",
                               "Invalid request: does not contain 'ProtectionEnabled' field")
        if self.on_ecs_call:  # the ECS API call the agent makes for the task
            operation = "UpdateTaskProtection" if body is not None else "GetTaskProtection"
            self.on_ecs_call(operation, {"cluster": self.cluster, "tasks": [arn]})
        if body is not None:
            minutes = body.get("ExpiresInMinutes")
            if body["ProtectionEnabled"] and minutes is not None and not 1 <= minutes <= MAX_MINUTES:
                return 400, _error(arn, "InvalidParameterException",
                                   f"expiresInMinutes must be between 1 and {MAX_MINUTES}", "0f1e2d3c-test-request")
        if isinstance(self.answer, EcsFailure):
            return 200, {"failure": {"Arn": arn, "Detail": self.answer.detail, "Reason": self.answer.reason}}
        if isinstance(self.answer, EcsError):
            return self.answer.status, _error(arn, self.answer.code, self.answer.message, self.answer.request_id)
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        with self._lock:
            if body is not None:
                enabled = bool(body["ProtectionEnabled"])
                expires = now + dt.timedelta(minutes=body.get("ExpiresInMinutes") or DEFAULT_MINUTES)
                task.enabled, task.expires = enabled, expires if enabled else None
            if task.expires is not None and task.expires <= now:  # protection lapses by itself
                task.enabled, task.expires = False, None
            expiry = task.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if task.expires else None
            return 200, {"protection": {"ExpirationDate": expiry, "ProtectionEnabled": task.enabled, "TaskArn": arn}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = agent._respond(self.command, self.path, raw)
                data = json.dumps(payload).encode() if payload is not None else b"404 page not found\n"
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if payload is not None else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _serve  # noqa: N815 (http.server's naming)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _decode(raw: bytes) -> Optional[dict[str, Any]]:
    """The request as the agent's decoder reads it (field names match case-insensitively, unknown
    fields and wrong types are refused); None where it would refuse it."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    fields = {"protectionenabled": ("ProtectionEnabled", bool), "expiresinminutes": ("ExpiresInMinutes", int)}
    body: dict[str, Any] = {}
    for key, item in value.items():
        name, kind = fields.get(key.lower(), (None, None))
        if name is None or kind is None:
            return None
        if item is None:
            continue  # JSON null leaves a Go pointer field unset
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            return None
        body[name] = item
    return body


def _error(arn: Optional[str], code: str, message: str, request_id: Optional[str] = None) -> dict[str, Any]:
    error: dict[str, Any] = {"Arn": arn} if arn else {}
    error.update(Code=code, Message=message)
    return {"requestID": request_id, "error": error} if request_id else {"error": error}
