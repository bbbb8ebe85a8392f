"""/v1/metrics: the /v1/stats figures, the health check, and finished tasks' timings as Prometheus histograms.

Timings are real histograms (prometheus_client's Histogram: cumulative buckets, `_sum`, `_count`), so
Prometheus computes any quantile over any range and sums them across scrape targets
(`histogram_quantile(0.95, sum by (le) (rate(acestep_run_seconds_bucket[5m])))`), which percentile gauges
cannot do. Every number comes from the task records, as on any backend: a task is observed once, the first
time a scrape sees it among the store's recent finished tasks (the newest ACESTEP_AVG_WINDOW), so a scrape
interval must not see more tasks finish than that window holds. The histograms belong to the store they
read and count from this process's first scrape on (a restart resets them, which Prometheus' rate() expects).

prometheus_client is imported on the first scrape only, so the API's start-up does not pay for it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator

from ..records import TaskRecord
from .health import HealthReport
from .metrics import TaskMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Queue wait spans an idle GPU fleet starting (minutes) down to a warm worker (under a second);
# run time a short clip on a fast GPU up to the generation timeout; stages a VAE decode up to a long LM plan.
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class FinishedTaskHistograms:
    """Queue wait, run time and engine stage times of finished tasks, each task observed once."""

    def __init__(self) -> None:
        from prometheus_client import Histogram

        # registry=None: they join each scrape's registry (render) rather than the process-global one.
        self.queue_wait = Histogram("acestep_queue_wait_seconds", "Time from submit to start of finished tasks",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=None)
        self.run = Histogram("acestep_run_seconds", "Time from start to finish of finished tasks",
                             buckets=RUN_BUCKETS, registry=None)
        self.stages = Histogram("acestep_stage_seconds", "Engine time per stage of finished tasks", ["stage"],
                                buckets=STAGE_BUCKETS, registry=None)
        self._lock = threading.Lock()
        self._seen: set[str] = set()  # the ids of the last window read: a task leaves it for good

    def observe_new(self, recent: list[TaskRecord]) -> int:
        """Observe the tasks of `recent` that the previous call did not see; how many there were."""
        with self._lock:
            new = [r for r in recent if r.task_id not in self._seen]
            for record in new:
                m = TaskMetrics.of(record)
                if m.queue_wait_s is not None:
                    self.queue_wait.observe(m.queue_wait_s)
                if m.run_s is not None:
                    self.run.observe(m.run_s)
                for stage, seconds in m.stages.items():
                    self.stages.labels(stage=stage).observe(seconds)
            self._seen = {r.task_id for r in recent}
            return len(new)

    def collectors(self) -> tuple[Any, ...]:
        return self.queue_wait, self.run, self.stages


_BY_STORE: "weakref.WeakKeyDictionary[object, FinishedTaskHistograms]" = weakref.WeakKeyDictionary()
_BY_STORE_LOCK = threading.Lock()


def histograms_for(store: object) -> FinishedTaskHistograms:
    """The histograms of the tasks of `store` (one set per store this process serves)."""
    with _BY_STORE_LOCK:
        found = _BY_STORE.get(store)
        if found is None:
            found = _BY_STORE[store] = FinishedTaskHistograms()
        return found


def render(stats: dict[str, Any], health: HealthReport, recent: list[TaskRecord], store: object) -> bytes:
    """Prometheus text: gauges of the store now and of the recent window, histograms of finished tasks."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric

    histograms = histograms_for(store)
    histograms.observe_new(recent)
    window = stats.get("recent") or {}

    class _Snapshot:
        def collect(self) -> Iterator[Metric]:
            tasks = GaugeMetricFamily("acestep_tasks", "Tasks in the store by status", labels=["status"])
            for status in ("queued", "running", "succeeded", "failed", "cancelled"):
                tasks.add_metric([status], stats["jobs"].get(status, 0))
            yield tasks
            yield GaugeMetricFamily("acestep_queue_depth", "Tasks waiting to be taken by a worker",
                                    value=health.waiting if health.waiting is not None else float("nan"))
            yield GaugeMetricFamily("acestep_workers_alive", "Workers whose heartbeat is recent",
                                    value=len(health.workers))
            yield GaugeMetricFamily("acestep_healthy", "1 when /health says ok", value=0 if health.reasons else 1)
            failures = GaugeMetricFamily("acestep_recent_failures", "Failed tasks among the recent ones, by reason",
                                         labels=["reason"])
            for reason, count in (window.get("failures_by_reason") or {}).items():
                failures.add_metric([reason], count)
            yield failures

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    for collector in histograms.collectors():
        registry.register(collector)
    return generate_latest(registry)
