"""Scale from zero: a submit starts the ECS worker service when it runs nothing (moto's ECS)."""
from __future__ import annotations

import boto3
import pytest

from engine.request import GenerationRequest
from service.aws.wake_workers import EcsWorkerWaker
from service.submission import submit_task
from tests.aws_support import aws_backend

CLUSTER, SERVICE = "acestep-test", "workers"


def _make_service(desired: int):
    ecs = boto3.client("ecs", region_name="us-east-1")
    ecs.create_cluster(clusterName=CLUSTER)
    ecs.register_task_definition(family="worker", containerDefinitions=[
        {"name": "worker", "image": "acestep-worker:test", "memory": 1024}])
    ecs.create_service(cluster=CLUSTER, serviceName=SERVICE, taskDefinition="worker", desiredCount=desired)
    return ecs


def _desired(ecs) -> int:
    return ecs.describe_services(cluster=CLUSTER, services=[SERVICE])["services"][0]["desiredCount"]


def _waker_client(seen: list[str]):
    """A client of the waker's own, recording the ECS calls it makes."""
    ecs = boto3.client("ecs", region_name="us-east-1")
    ecs.meta.events.register("before-call.ecs.*", lambda model, **kw: seen.append(model.name))
    return ecs


def test_a_submit_starts_the_idle_worker_service(tmp_path):
    with aws_backend(tmp_path, ecs_cluster=CLUSTER, ecs_service=SERVICE) as backend:
        ecs = _make_service(desired=0)
        submit_task(backend, GenerationRequest(audio_duration=10), 10)
        assert _desired(ecs) == 1
        assert backend.queue.size() == 1  # queued as usual


def test_waker_leaves_a_running_service_alone_and_checks_at_most_every_interval(tmp_path):
    with aws_backend(tmp_path):
        ecs, calls = _make_service(desired=2), []
        waker = EcsWorkerWaker(lambda: _waker_client(calls), CLUSTER, SERVICE, recheck_seconds=60)
        assert waker() is False and _desired(ecs) == 2  # never lowered, never touched
        assert waker() is False  # within the interval: no call at all
        assert calls == ["DescribeServices"]


def test_waker_starts_a_service_at_zero_once(tmp_path):
    with aws_backend(tmp_path):
        ecs, calls = _make_service(desired=0), []
        waker = EcsWorkerWaker(lambda: _waker_client(calls), CLUSTER, SERVICE, recheck_seconds=0)
        assert waker() is True and _desired(ecs) == 1
        assert waker() is False  # already at 1
        assert calls == ["DescribeServices", "UpdateService", "DescribeServices"]


def test_a_missing_service_does_not_fail_the_submit(tmp_path):
    with aws_backend(tmp_path, ecs_cluster="no-such-cluster", ecs_service=SERVICE) as backend:
        task_id, _ = submit_task(backend, GenerationRequest(audio_duration=10), 10)
        assert backend.store.get(task_id).status == "queued"


@pytest.mark.parametrize("cluster,service", [("", ""), (CLUSTER, "")])
def test_no_waker_unless_both_names_are_set(tmp_path, cluster, service):
    with aws_backend(tmp_path, ecs_cluster=cluster, ecs_service=service) as backend:
        assert backend.intake.on_queued is None
