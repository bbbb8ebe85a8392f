"""ECS task scale-in protection against a local HTTP server standing in for the ECS agent endpoint.

moto has no agent endpoint ($ECS_AGENT_URI is served by the agent on the instance, not by an AWS
API), so tests/ecs_agent_support.py, which answers as the agent documents, is the boundary here.
"""
from __future__ import annotations

import json
import urllib.request

import pytest

from service.aws.task_protection import STATE_PATH, EcsTaskProtection, TaskProtectionError, minutes_for
from service.worker import Worker
from tests.ecs_agent_support import EcsAgent, EcsError, EcsFailure
from tests.worker_support import ScriptedEngine, submit

TASK_ID = "0123456789abcdef"


@pytest.fixture
def agent():
    with EcsAgent(cluster="cluster") as fake:
        yield fake


def _state(uri: str, method: str = "GET", body: object = None) -> tuple[int, dict]:
    """A raw call to the stand-in, as `curl $ECS_AGENT_URI/task-protection/v1/state` would make it."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(uri + STATE_PATH, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_stand_in_answers_in_the_agents_documented_shapes(agent):
    uri = agent.uri_for(TASK_ID)
    arn = f"arn:aws:ecs:us-east-1:123456789012:task/cluster/{TASK_ID}"
    assert _state(uri) == (200, {"protection": {"ExpirationDate": None, "ProtectionEnabled": False, "TaskArn": arn}})
    status, put = _state(uri, "PUT", {"ProtectionEnabled": True})  # no expiry given: 120 minutes
    assert status == 200 and put["protection"]["ProtectionEnabled"] is True
    assert put["protection"]["ExpirationDate"].endswith("Z") and _state(uri) == (200, put)
    assert _state(uri, "PUT", {"ProtectionEnabled": False})[1]["protection"]["ExpirationDate"] is None
    assert _state(uri, "PUT", {"ExpiresInMinutes": 5}) == (400, {"error": {
        "Arn": arn, "Code": "InvalidParameterException",
        "Message": "Invalid request: does not contain 'ProtectionEnabled' field"}})
    assert _state(uri, "PUT", {"ProtectionEnabled": True, "Tasks": ["x"]})[0] == 400  # unknown field
    assert _state(uri, "PUT", {"ProtectionEnabled": True, "ExpiresInMinutes": 2881})[1]["error"]["Code"] == \
        "InvalidParameterException"
    assert _state(agent.base + "/api/unknown")[0] == 404  # an endpoint id the agent gave no container


def test_busy_protects_with_an_expiry_and_idle_clears_once(agent):
    protection = EcsTaskProtection(agent.uri_for(TASK_ID), expires_minutes=40)
    protection.busy()
    protection.busy()  # each task renews the expiry
    protection.idle()
    protection.idle()  # already cleared: no call
    assert [(r.method, r.endpoint_id, r.body) for r in agent.requests] == [
        ("PUT", TASK_ID, {"ProtectionEnabled": True, "ExpiresInMinutes": 40}),
        ("PUT", TASK_ID, {"ProtectionEnabled": True, "ExpiresInMinutes": 40}),
        ("PUT", TASK_ID, {"ProtectionEnabled": False}),
    ]
    assert protection.protected is False
    assert _state(agent.uri_for(TASK_ID))[1]["protection"]["ProtectionEnabled"] is False


def test_a_refusal_from_the_agent_raises_with_its_reason(agent):
    protection = EcsTaskProtection(agent.uri_for(TASK_ID), expires_minutes=40)
    agent.answer = EcsFailure("TASK_NOT_VALID")
    with pytest.raises(TaskProtectionError, match="TASK_NOT_VALID"):
        protection.busy()
    agent.answer = EcsError(400, "AccessDeniedException", "not authorized to perform ecs:UpdateTaskProtection")
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
    protection = EcsTaskProtection(agent.uri_for(TASK_ID), expires_minutes=40)
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
    agent.answer = EcsError(500, "ServerException", "Unexpected error occurred", request_id=None)
    worker = Worker(settings, backend, ScriptedEngine(),
                    on_busy=EcsTaskProtection(agent.uri_for(TASK_ID), expires_minutes=40).set_busy)
    task_id = submit(backend)
    assert worker.run_once(0.1) is True
    assert backend.store.get(task_id).status == "succeeded"
