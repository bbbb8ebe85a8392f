"""Logs, metrics and health as an operator reads them: request ids, JSON lines, /health, /v1/stats,
/v1/metrics, and the workers' CloudWatch EMF records."""
from __future__ import annotations

import io
import json
import logging
import time

import pytest

from service.observability.health import ALIVE_WITHIN_SECONDS, check_health
from service.observability.logs import configure_logging, log_context
from service.observability.metrics import EmfMetrics, TaskMetrics, failure_label, summarize
from service.records import FAILED, SUCCEEDED, FailureReason, TaskRecord, TaskResult, WorkerHeartbeat
from tests.api_support import make_api
from engine.request import GenerationRequest


@pytest.fixture
def api(settings):
    return make_api(settings)


@pytest.fixture
def json_logs():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "json", stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_json_lines_carry_the_bound_context(json_logs):
    log = logging.getLogger("service.worker")
    with log_context(task_id="t1", attempt=2):
        log.info("inside %s", "task")
    log.info("outside")
    inside, outside = json_logs()
    assert inside["message"] == "inside task" and inside["task_id"] == "t1" and inside["attempt"] == 2
    assert inside["logger"] == "service.worker" and inside["level"] == "INFO" and inside["time"]
    assert "task_id" not in outside


def test_each_request_has_an_id_on_its_lines_and_in_its_response(api, json_logs):
    r = api.client.post("/release_task", json={"prompt": "x", "audio_duration": 10})
    generated = r.headers["x-request-id"]
    r2 = api.client.get("/health", headers={"X-Request-ID": "client-chosen-1"})
    assert r2.headers["x-request-id"] == "client-chosen-1"
    r3 = api.client.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert r3.headers["x-request-id"] != "bad id with spaces"
    lines = json_logs()
    submit_lines = [line for line in lines if line.get("request_id") == generated]
    task_id = r.json()["data"]["task_id"]
    assert any(line.get("task_id") == task_id and "queued" in line["message"] for line in submit_lines)
    access = [line for line in submit_lines if line["logger"] == "handlers.request_context"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/release_task"
    assert any(line.get("request_id") == "client-chosen-1" for line in lines)


def test_lambda_request_id_is_api_gateways():
    from handlers.request_context import request_id_of

    scope = {"headers": [], "aws.event": {"requestContext": {"requestId": "Ab1-gw-id"}}}
    assert request_id_of(scope) == "Ab1-gw-id"
    assert request_id_of({**scope, "headers": [(b"x-request-id", b"mine")]}) == "mine"


def test_health_is_degraded_when_tasks_wait_and_no_worker_is_alive(api):
    data = api.client.get("/health").json()["data"]
    assert data["status"] == "ok" and data["reasons"] == []  # idle, no worker: fine (scale to zero)
    api.submit(prompt="x", audio_duration=10)
    r = api.client.get("/health")
    data = r.json()["data"]
    assert r.status_code == 200 and data["status"] == "degraded"
    assert data["reasons"] == ["1 task(s) waiting and no working worker alive (no worker has reported)"]
    now = time.time()
    api.backend.store.record_heartbeat(WorkerHeartbeat(worker_id="w", started_at=now, beat_at=now))
    data = api.client.get("/health").json()["data"]
    assert data["status"] == "ok" and data["workers_alive"] == 1 and data["workers"][0]["worker_id"] == "w"


def test_health_names_a_worker_without_progress(api):
    now = time.time()
    api.backend.store.record_heartbeat(WorkerHeartbeat(
        worker_id="w", started_at=now - 999, beat_at=now, state="running", task_ids=["t9"],
        last_progress_at=now - api.settings.stall_timeout - 30))
    data = api.client.get("/health").json()["data"]
    assert data["status"] == "degraded" and data["reasons"][0].startswith("worker w: no progress for")
    # Issue 21.17: /health answers anyone, so it names no task (an id lets its holder read and cancel it)
    assert "t9" not in json.dumps(data) and data["workers"][0]["tasks"] == 1


def test_health_names_running_tasks_to_the_key_holder_only(settings):
    from tests.api_support import make_api

    api = make_api(settings, api_key="sk-health")
    now = time.time()
    api.backend.store.record_heartbeat(WorkerHeartbeat(worker_id="w", started_at=now, beat_at=now, state="running",
                                                       task_ids=["t9"], last_progress_at=now - 10_000))
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        assert "t9" not in api.client.get("/health", headers=headers).text
    data = api.client.get("/health", headers={"Authorization": "Bearer sk-health"}).json()["data"]
    assert data["workers"][0]["task_ids"] == ["t9"] and "t9" in data["reasons"][0]


def test_health_is_503_with_the_reason_when_the_store_is_down(api, monkeypatch):
    def down():
        raise OSError("disk I/O error")

    monkeypatch.setattr(api.backend.store, "heartbeats", down)
    monkeypatch.setattr(api.backend.store, "get_meta", lambda key: down())
    r = api.client.get("/health")
    assert r.status_code == 503
    assert r.json()["data"]["reasons"] == ["task store unreachable (OSError: disk I/O error)"]


def test_a_silent_worker_counts_as_down(api):
    old = time.time() - ALIVE_WITHIN_SECONDS - 5
    api.backend.store.record_heartbeat(WorkerHeartbeat(worker_id="w", started_at=old, beat_at=old))
    api.submit(prompt="x", audio_duration=10)
    report = check_health(api.backend, api.settings.stall_timeout)
    assert report.workers == [] and "the last heartbeat was" in report.reasons[0]


def test_stats_and_prometheus_metrics_describe_recent_tasks(api):
    api.submit(prompt="fine", audio_duration=10)
    api.submit(prompt="PLEASE FAIL", audio_duration=10)
    api.run_worker()
    stats = api.client.get("/v1/stats").json()["data"]
    recent = stats["recent"]
    assert recent["window_tasks"] == 2 and recent["failures_by_reason"] == {"rejected": 1}
    assert recent["queue_wait_seconds"]["max"] >= 0 and recent["run_seconds"]["p50"] >= 0
    text = api.client.get("/v1/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    body = text.text
    assert 'acestep_tasks{status="succeeded"} 1.0' in body and 'acestep_tasks{status="failed"} 1.0' in body
    assert 'acestep_recent_failures{reason="rejected"} 1.0' in body
    assert "acestep_queue_depth 0.0" in body and "acestep_healthy 1.0" in body


def _families(body: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(body)}


def _sample(family, name: str, **labels) -> float:
    (value,) = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return value


def test_prometheus_timings_are_cumulative_histograms_counting_each_task_once(api):
    """Histograms (not percentile gauges) so Prometheus can aggregate them; a second scrape adds nothing, a newly
    finished task adds one observation."""
    for prompt in ("one", "two"):
        api.submit(prompt=prompt, audio_duration=10)
    api.run_worker()
    first = _families(api.client.get("/v1/metrics").text)
    for name in ("acestep_queue_wait_seconds", "acestep_run_seconds", "acestep_stage_seconds"):
        assert first[name].type == "histogram", name
    run = first["acestep_run_seconds"]
    assert _sample(run, "acestep_run_seconds_count") == 2 == _sample(run, "acestep_run_seconds_bucket", le="+Inf")
    assert _sample(run, "acestep_run_seconds_sum") > 0

    again = _families(api.client.get("/v1/metrics").text)
    assert _sample(again["acestep_run_seconds"], "acestep_run_seconds_count") == 2

    api.submit(prompt="three", audio_duration=10)
    api.run_worker()
    later = _families(api.client.get("/v1/metrics").text)
    assert _sample(later["acestep_run_seconds"], "acestep_run_seconds_count") == 3
    assert _sample(later["acestep_queue_wait_seconds"], "acestep_queue_wait_seconds_count") == 3


def test_histogram_buckets_hold_what_the_records_say():
    from service.observability.prometheus import FinishedTaskHistograms

    now = time.time()

    def finished(task_id, wait, run, timings=None):
        return TaskRecord(task_id=task_id, request=GenerationRequest(), status=SUCCEEDED, created_at=now - wait - run,
                          started_at=now - run, finished_at=now, result=TaskResult(generation_info={"timings": timings or {}}))

    histograms = FinishedTaskHistograms()
    window = [finished("a", 0.3, 4.0, {"dit_s": 3.0}), finished("b", 40.0, 25.0, {"dit_s": 20.0})]
    assert histograms.observe_new(window) == 2
    assert histograms.observe_new(window) == 0  # the same window again
    # the window slides: "a" leaves, "c" arrives; only "c" is new
    assert histograms.observe_new([finished("c", 1.5, 8.0), window[1]]) == 1
    run = {s.labels.get("le"): s.value for s in histograms.run.collect()[0].samples if s.name.endswith("_bucket")}
    assert (run["5.0"], run["10.0"], run["30.0"], run["+Inf"]) == (1, 2, 3, 3)
    wait = {s.labels.get("le"): s.value for s in histograms.queue_wait.collect()[0].samples if s.name.endswith("_bucket")}
    assert (wait["0.5"], wait["2.0"], wait["60.0"]) == (1, 2, 3)
    dit = [s for s in histograms.stages.collect()[0].samples if s.name.endswith("_count")]
    assert [(s.labels["stage"], s.value) for s in dit] == [("dit", 2)]


def test_metrics_need_the_api_key(settings):
    api = make_api(settings, api_key="sk-test")
    assert api.client.get("/v1/metrics").status_code == 401
    assert api.client.get("/v1/metrics", headers=api.headers()).status_code == 200


def test_failure_labels_and_summary():
    # Every reason has a graphed label; the labels dashboards already use stay as they were.
    assert {failure_label(r) for r in FailureReason} >= {"timeout", "worker_lost", "engine_crash", "rejected"}
    assert failure_label(FailureReason.STALL_TIMEOUT) == failure_label(FailureReason.GENERATION_TIMEOUT) == "timeout"
    assert failure_label(FailureReason.DEAD_LETTERED) == "worker_lost"
    assert failure_label(FailureReason.ENGINE_ERROR) == "engine_crash"
    assert failure_label(None) == "unknown"  # a failed record written before reasons were stored
    now = time.time()
    ok = TaskRecord(task_id="a", request=GenerationRequest(), status=SUCCEEDED, created_at=now - 10, started_at=now - 8,
                    finished_at=now - 2, result=TaskResult(generation_info={"timings": {"dit_s": 4.0, "vae_decode_s": 1.0}}))
    bad = TaskRecord(task_id="b", request=GenerationRequest(), status=FAILED, created_at=now - 5, started_at=now - 5,
                     finished_at=now - 4, error="generation timed out after 1 s",
                     reason=FailureReason.GENERATION_TIMEOUT)
    summary = summarize([ok, bad])
    assert summary["stage_seconds_mean"] == {"dit": 4.0, "vae_decode": 1.0}
    assert summary["failures_by_reason"] == {"timeout": 1}
    assert summary["queue_wait_seconds"]["max"] == pytest.approx(2.0, abs=0.01)
    assert summary["run_seconds"]["max"] == pytest.approx(6.0, abs=0.01)


def test_emf_records_are_cloudwatch_metrics(capsys):
    sink = EmfMetrics()
    sink.task_finished(TaskMetrics(status=FAILED, queue_wait_s=1.5, run_s=3.0, stages={"dit": 2.0}, reason="timeout"))
    sink.queue_depth(4)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(records) == 3
    task, by_reason, depth = records
    names = {m["Name"] for m in task["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert {"TasksFailed", "QueueWaitSeconds", "RunSeconds", "StageSeconds_dit"} <= names
    assert task["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "ACEStep" and task["QueueWaitSeconds"] in (1.5, [1.5])
    assert by_reason["reason"] == "timeout" and by_reason["FailuresByReason"] in (1.0, [1.0])
    assert depth["QueueDepth"] in (4.0, [4.0])


def test_submit_is_refused_with_the_reason_when_every_live_worker_is_broken(api):
    now = time.time()
    api.backend.store.record_heartbeat(WorkerHeartbeat(
        worker_id="gpu-1", started_at=now, beat_at=now, state="failed",
        error="ModelNotFound: model 'acestep-v15-turbo' is not available"))
    r = api.client.post("/release_task", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "60"
    assert "gpu-1: ModelNotFound: model 'acestep-v15-turbo' is not available" in r.json()["detail"]
    assert api.backend.store.counts()["total"] == 0
    api.backend.store.record_heartbeat(WorkerHeartbeat(worker_id="gpu-2", started_at=now, beat_at=now))
    assert api.client.post("/release_task", json={"prompt": "x"}).status_code == 200


def test_worker_load_failure_is_a_cloudwatch_metric_the_stack_alarms_on(capsys):
    EmfMetrics().worker_load_failed()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "ACEStep" and ["service"] in directive["Dimensions"]
    assert record["service"] == "worker" and record["WorkerLoadFailures"] in (1.0, [1.0])
