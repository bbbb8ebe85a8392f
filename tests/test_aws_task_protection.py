"""ECS task scale-in protection against a local HTTP server standing in for the ECS agent endpoint.

moto has no agent endpoint ($ECS_AGENT_URI is served by the agent on the instance, not by an AWS
API), so a small server that answers the way the agent documents is the boundary here.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.aws.task_protection import STATE_PATH, EcsTaskProtection, TaskProtectionError, minutes_for
from service.worker import Worker
from tests.worker_support import ScriptedEngine, submit

TASK_ARN = "arn:aws:ecs:us-east-1:123456789012:task/cluster/0123456789abcdef"


class FakeAgent:
    """Records each PUT body; answers like the agent (success, failure, or an error status)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.answer: tuple[int, dict] | None = None  # None: succeed
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                agent.calls.append({"path": self.path, **body})
                status, payload = agent.answer or (200, {"protection": {
                    "ProtectionEnabled": body["ProtectionEnabled"], "TaskArn": TASK_ARN,
                    "ExpirationDate": "2026-11-25T21:00:00Z" if body["ProtectionEnabled"] else None}})
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/api/{TASK_ARN.rsplit('/', 1)[-1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def states(self) -> list[bool]:
        return [c["ProtectionEnabled"] for c in self.calls]


@pytest.fixture
def agent():
    fake = FakeAgent()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_busy_protects_with_an_expiry_and_idle_clears_once(agent):
    protection = EcsTaskProtection(agent.uri, expires_minutes=40)
    protection.busy()
    protection.busy()  # each task renews the expiry
    protection.idle()
    protection.idle()  # already cleared: no call
    assert agent.calls == [
        {"path": "/api/0123456789abcdef" + STATE_PATH, "ProtectionEnabled": True, "ExpiresInMinutes": 40},
        {"path": "/api/0123456789abcdef" + STATE_PATH, "ProtectionEnabled": True, "ExpiresInMinutes": 40},
        {"path": "/api/0123456789abcdef" + STATE_PATH, "ProtectionEnabled": False},
    ]
    assert protection.protected is False


def test_a_refusal_from_the_agent_raises_with_its_reason(agent):
    protection = EcsTaskProtection(agent.uri, expires_minutes=40)
    agent.answer = (200, {"failure": {"Arn": TASK_ARN, "Reason": "TASK_NOT_VALID"}})
    with pytest.raises(TaskProtectionError, match="TASK_NOT_VALID"):
        protection.busy()
    agent.answer = (400, {"error": {"Arn": TASK_ARN, "Code": "AccessDeniedException",
                                    "Message": "not authorized to perform ecs:UpdateTaskProtection"}})
    with pytest.raises(TaskProtectionError, match="HTTP 400.*AccessDeniedException"):
        protection.busy()
    assert protection.protected is None  # never confirmed


def test_an_unreachable_agent_raises():
    with pytest.raises(TaskProtectionError, match="unreachable"):
        EcsTaskProtection("http://127.0.0.1:9/api/x", 10, timeout_seconds=0.5).busy()


def test_only_ecs_tasks_get_protection_and_it_outlasts_one_task():
    assert EcsTaskProtection.from_environment(1800, environ={}) is None
    found = EcsTaskProtection.from_environment(1800, environ={"ECS_AGENT_URI": "http://169.254.170.2/api/x"})
    assert found is not None and found.url == "http://169.254.170.2/api/x" + STATE_PATH
    assert found.expires_minutes == minutes_for(1800) == 40
    assert minutes_for(10 ** 6) == 2880  # the agent's ceiling


def test_worker_is_protected_while_it_runs_a_task_and_cleared_when_idle(settings, agent):
    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    engine = ScriptedEngine()
    protection = EcsTaskProtection(agent.uri, expires_minutes=40)
    seen_during_run: list[list[bool]] = []
    engine.before_generate = lambda progress: seen_during_run.append(agent.states())
    worker = Worker(settings, backend, engine, on_busy=protection.set_busy)
    submit(backend)
    assert worker.run_once(0.1) is True
    assert seen_during_run == [[True]]  # protected before the engine started
    assert worker.run_once(0.1) is False  # nothing waiting: idle
    assert agent.states() == [True, False]


def test_a_failing_agent_does_not_stop_the_task(settings, agent):
    from service.embedded import make_embedded_backend

    backend = make_embedded_backend(settings)
    agent.answer = (500, {"error": {"Code": "ServerException", "Message": "agent restarting"}})
    worker = Worker(settings, backend, ScriptedEngine(),
                    on_busy=EcsTaskProtection(agent.uri, expires_minutes=40).set_busy)
    task_id = submit(backend)
    assert worker.run_once(0.1) is True
    assert backend.store.get(task_id).status == "succeeded"
