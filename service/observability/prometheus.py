"""/v1/metrics: the /v1/stats figures and the health check in Prometheus' text format.

prometheus_client renders them (escaping, types, HELP lines); it is imported on the first scrape
only, so the API's start-up does not pay for it.
"""
from __future__ import annotations

from .health import HealthReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(stats: dict, health: HealthReport) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    recent = stats.get("recent") or {}

    class _Snapshot:
        def collect(self):
            tasks = GaugeMetricFamily("acestep_tasks", "Tasks in the store by status", labels=["status"])
            for status in ("queued", "running", "succeeded", "failed", "cancelled"):
                tasks.add_metric([status], stats["jobs"].get(status, 0))
            yield tasks
            yield GaugeMetricFamily("acestep_queue_depth", "Tasks waiting to be taken by a worker",
                                    value=health.waiting if health.waiting is not None else float("nan"))
            yield GaugeMetricFamily("acestep_workers_alive", "Workers whose heartbeat is recent",
                                    value=len(health.workers))
            yield GaugeMetricFamily("acestep_healthy", "1 when /health says ok", value=0 if health.reasons else 1)
            for name, key, text in (("acestep_queue_wait_seconds", "queue_wait_seconds", "Time from submit to start"),
                                    ("acestep_run_seconds", "run_seconds", "Time from start to finish")):
                family = GaugeMetricFamily(name, f"{text}, over the recent finished tasks", labels=["stat"])
                for stat, value in (recent.get(key) or {}).items():
                    family.add_metric([stat], value)
                yield family
            stages = GaugeMetricFamily("acestep_stage_seconds_mean", "Mean engine time per stage, recent tasks",
                                       labels=["stage"])
            for stage, value in (recent.get("stage_seconds_mean") or {}).items():
                stages.add_metric([stage], value)
            yield stages
            failures = GaugeMetricFamily("acestep_recent_failures", "Failed tasks among the recent ones, by reason",
                                         labels=["reason"])
            for reason, count in (recent.get("failures_by_reason") or {}).items():
                failures.add_metric([reason], count)
            yield failures

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)
