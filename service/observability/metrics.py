"""Metrics a person can graph: queue depth, queue wait, generation time per stage, failures by reason.

Two ways out, the same numbers:
- workers on AWS write one CloudWatch Embedded Metric Format record per finished task (and the
  queue depth now and then) to stdout, which CloudWatch Logs turns into metrics;
- the API summarises the store's recent finished tasks for /v1/stats and /v1/metrics (Prometheus
  text), which works on any backend because every number comes from the task records.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from ..records import FAILED, SUCCEEDED, FailureReason, TaskRecord, TaskResult

log = logging.getLogger(__name__)

NAMESPACE = "ACEStep"

# The label each failure reason is graphed under: stable names (dashboards and alarms use them), some
# coarser than the reasons.
_LABELS: dict[FailureReason, str] = {
    FailureReason.STALL_TIMEOUT: "timeout",
    FailureReason.GENERATION_TIMEOUT: "timeout",
    FailureReason.DEAD_LETTERED: "worker_lost",
    FailureReason.ENGINE_LOAD_FAILED: "worker_broken",
    FailureReason.LM_UNAVAILABLE: "lm_unavailable",
    FailureReason.INPUT_MISSING: "input_missing",
    FailureReason.ADAPTER_MISSING: "input_missing",
    FailureReason.INPUT_TOO_LARGE: "input_too_large",
    FailureReason.COST_REFUSED: "rejected",
    FailureReason.INVALID_REQUEST: "rejected",
    FailureReason.MODEL_UNLOADED: "rejected",
    FailureReason.REJECTED: "rejected",
    FailureReason.ENGINE_ERROR: "engine_crash",
    FailureReason.CANCELLED: "cancelled",
}
UNKNOWN_LABEL = "unknown"  # a failed record written before reasons were stored


def failure_label(reason: Optional[FailureReason]) -> str:
    return _LABELS[reason] if reason is not None else UNKNOWN_LABEL


@dataclass
class TaskMetrics:
    """What one finished task contributes to the metrics."""
    status: str
    queue_wait_s: Optional[float]
    run_s: Optional[float]
    stages: dict[str, float] = field(default_factory=dict)  # engine timings, seconds
    reason: Optional[str] = None  # failure_label for failed tasks

    @classmethod
    def of(cls, record: TaskRecord) -> "TaskMetrics":
        reason = failure_label(record.reason) if record.status == FAILED else None
        return cls._timed(record.status, record.created_at, record.started_at, record.finished_at, record.result,
                          reason)

    @classmethod
    def succeeded(cls, result: TaskResult, created_at: float, started_at: Optional[float],
                  finished_at: float) -> "TaskMetrics":
        return cls._timed(SUCCEEDED, created_at, started_at, finished_at, result, None)

    @classmethod
    def failed(cls, reason: FailureReason, created_at: float, started_at: Optional[float],
               finished_at: float) -> "TaskMetrics":
        return cls._timed(FAILED, created_at, started_at, finished_at, None, failure_label(reason))

    @classmethod
    def _timed(cls, status: str, created_at: float, started_at: Optional[float], finished_at: Optional[float],
               result: Optional[TaskResult], reason: Optional[str]) -> "TaskMetrics":
        wait = run = None
        if started_at is not None:
            wait = max(0.0, started_at - created_at)
            if finished_at is not None:
                run = max(0.0, finished_at - started_at)
        stages: dict[str, float] = {}
        if result is not None:
            timings = result.generation_info.get("timings")
            if isinstance(timings, dict):
                stages = {k.removesuffix("_s"): float(v) for k, v in timings.items() if isinstance(v, (int, float))}
        return cls(status, wait, run, stages, reason)


class MetricsSink(Protocol):
    def task_finished(self, metrics: TaskMetrics) -> None: ...

    def queue_depth(self, waiting: int) -> None: ...

    def worker_load_failed(self) -> None: ...


class NoMetrics:
    """Embedded: the API reads the same numbers from the store (summarize)."""

    def task_finished(self, metrics: TaskMetrics) -> None:
        pass

    def queue_depth(self, waiting: int) -> None:
        pass

    def worker_load_failed(self) -> None:
        pass


class EmfMetrics:
    """CloudWatch metrics through Powertools' EMF writer (stdout, picked up from the ECS log group)."""

    def __init__(self, service: str = "worker"):
        from aws_lambda_powertools import Metrics  # AWS workers only

        self._metrics = Metrics(namespace=NAMESPACE, service=service)

    def task_finished(self, m: TaskMetrics) -> None:
        from aws_lambda_powertools.metrics import MetricUnit

        self._metrics.add_metric(name="TasksSucceeded" if m.reason is None else "TasksFailed",
                                 unit=MetricUnit.Count, value=1)
        if m.queue_wait_s is not None:
            self._metrics.add_metric(name="QueueWaitSeconds", unit=MetricUnit.Seconds, value=m.queue_wait_s)
        if m.run_s is not None:
            self._metrics.add_metric(name="RunSeconds", unit=MetricUnit.Seconds, value=m.run_s)
        for stage, seconds in m.stages.items():
            self._metrics.add_metric(name=f"StageSeconds_{stage}", unit=MetricUnit.Seconds, value=seconds)
        self._flush()
        if m.reason is not None:  # its own record: the reason is a dimension, graphable per reason
            self._metrics.add_dimension(name="reason", value=m.reason)
            self._metrics.add_metric(name="FailuresByReason", unit=MetricUnit.Count, value=1)
            self._flush()

    def queue_depth(self, waiting: int) -> None:
        from aws_lambda_powertools.metrics import MetricUnit

        self._metrics.add_metric(name="QueueDepth", unit=MetricUnit.Count, value=waiting)
        self._flush()

    def worker_load_failed(self) -> None:
        """The CDK stack alarms on this metric: a worker is up but cannot load its models."""
        from aws_lambda_powertools.metrics import MetricUnit

        self._metrics.add_metric(name="WorkerLoadFailures", unit=MetricUnit.Count, value=1)
        self._flush()

    def _flush(self) -> None:
        try:
            self._metrics.flush_metrics()
        except Exception:  # metrics must never fail a task
            log.warning("could not write metrics", exc_info=True)


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": at(0.5), "p95": at(0.95), "max": round(ordered[-1], 4), "mean": round(statistics.fmean(ordered), 4)}


def summarize(recent: list[TaskRecord]) -> dict[str, Any]:
    """Queue wait, run time, stage times and failures by reason over `recent` finished tasks."""
    rows = [TaskMetrics.of(r) for r in recent]
    stage_values: dict[str, list[float]] = {}
    for m in rows:
        for stage, seconds in m.stages.items():
            stage_values.setdefault(stage, []).append(seconds)
    failures: dict[str, int] = {}
    for m in rows:
        if m.reason is not None:
            failures[m.reason] = failures.get(m.reason, 0) + 1
    return {
        "window_tasks": len(rows),
        "queue_wait_seconds": _quantiles([m.queue_wait_s for m in rows if m.queue_wait_s is not None]),
        "run_seconds": _quantiles([m.run_s for m in rows if m.run_s is not None]),
        "stage_seconds_mean": {k: round(statistics.fmean(v), 4) for k, v in sorted(stage_values.items())},
        "failures_by_reason": dict(sorted(failures.items())),
    }
