"""GET /health, GET /v1/models, GET /v1/stats, GET /v1/metrics (Prometheus text)."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from engine.request import TASK_TYPES
from service.config import Settings
from service.fleet import served_model_names, switch_state
from service.gpu_status import gpu_status
from service.ports import Backend
from service.observability import prometheus
from service.observability.health import alive_only, check_health, healthy
from service.observability.metrics import summarize
from service.records import MODELS_META_KEY, ModelsMeta, TaskRecord, WorkerHeartbeat
from service.version import __version__

from .auth import header_is_valid, require_header
from .deps import backend_of, settings_of
from .envelope import Enveloped, wrap
from .openapi_bodies import error_responses
from .openapi_responses import Envelope, Health, ModelInventory, ok

log = logging.getLogger(__name__)
router = APIRouter(tags=["info"])


def _models_meta(backend: Backend) -> Optional[ModelsMeta]:
    try:
        return ModelsMeta.parse(backend.store.get_meta(MODELS_META_KEY))
    except Exception:  # the API keeps answering when the store is briefly unavailable
        log.warning("could not read the models meta", exc_info=True)
        return None


def _live_workers(backend: Backend) -> list[WorkerHeartbeat]:
    try:
        return healthy(alive_only(backend.store.heartbeats(), time.time()))
    except Exception:  # as for the meta: the listing still answers
        log.warning("could not read the workers' heartbeats", exc_info=True)
        return []


def model_list(settings: Settings, backend: Backend) -> dict[str, Any]:
    """`{models: [{name, is_default, random_weights, task_types?, is_loaded, supported_task_types}],
    default_model, lm_models, loaded_lm_model, llm_initialized, gpus, gpu_mapping, device_map, ...}` (upstream's
    inventory and ours; the GPU keys from the live workers' heartbeats, service/gpu_status.py).

    Names come from the settings; random_weights/task_types from what the worker recorded at
    startup (null before any worker has started); is_loaded: a live, healthy worker has it in memory.
    """
    meta = _models_meta(backend)
    live = _live_workers(backend)
    names = served_model_names(settings, backend)  # the start-up set, or what POST /v1/init switched to
    default = names[0] if names else None
    models = []
    for name in names:
        info = meta.find(name) if meta else None
        entry: dict[str, Any] = {"name": name, "is_default": name == default,
                                 "random_weights": info.random_weights if info else None}
        if info and info.task_types:
            entry["task_types"] = list(info.task_types)
        entry["is_loaded"] = bool(live and info)
        entry["supported_task_types"] = list(info.task_types) if info and info.task_types else list(TASK_TYPES)
        models.append(entry)
    lm = meta.lm_model if meta and meta.lm_model not in (None, "", "none") else None
    lm_live = bool(lm) and any(b.lm_model == lm for b in live)
    out: dict[str, object] = {"models": models, "default_model": default,
                              "lm_models": [{"name": lm, "is_loaded": lm_live}] if lm else [],
                              "loaded_lm_model": lm if lm_live else None, "llm_initialized": lm_live,
                              **gpu_status(live)}  # upstream's gpus, gpu_mapping, device_map
    switch = switch_state(settings, backend)
    if switch is not None:  # a POST /v1/init wish: loading, loaded, or failed (with why) on the live workers
        out["model_switch"] = switch
    if meta:
        out["lm_model"] = meta.lm_model
        out["device"] = meta.device
        out["quantization"] = meta.quantization
        out["updated_at"] = meta.updated_at
    return out


def demo_state(models: list[dict[str, Any]]) -> bool | str:
    """True when a demo (random-weight) model serves; "unknown" until a worker has said what it loaded."""
    flags = [m["random_weights"] for m in models]
    if any(flags):
        return True
    return False if flags and all(f is not None for f in flags) else "unknown"


def health_data(settings: Settings, backend: Backend, keyed: bool = False) -> tuple[dict[str, Any], bool]:
    """`keyed`: the caller presented the configured API key, so may see which tasks run."""
    report = check_health(backend, settings.stall_timeout, name_tasks=keyed)
    listing = model_list(settings, backend) if report.store_ok else {"models": []}
    models = [{"name": m["name"], "is_default": m["is_default"], "random_weights": m["random_weights"]}
              for m in listing["models"]]
    listed = listing.get("models") or []
    data = {"status": report.status, "service": "ACE-Step API", "version": __version__, "backend": backend.name,
            # upstream's newer /health keys, as its inventory: the default model loaded by a live worker, the LM
            "models_initialized": bool(listed and listed[0]["is_loaded"]),
            "llm_initialized": bool(listing.get("llm_initialized")), "loaded_model": listing.get("default_model"),
            "loaded_lm_model": listing.get("loaded_lm_model"),
            **{k: listing.get(k, v) for k, v in gpu_status([]).items()},  # upstream's GPU keys (none: store down)
            "models": models, "demo": demo_state(models), "reasons": report.reasons,
            **({"model_switch": listing["model_switch"]} if "model_switch" in listing else {}),
            "queue_waiting": report.waiting, "workers_alive": len(report.workers), "workers": report.workers}
    return data, report.serving


@router.get("/health", summary="Health check (no auth)",
            responses={**ok(Envelope[Health]), 503: {"model": Envelope[Health], "description": "degraded: "
                                                     "the store or the queue is unreachable"}})
async def health(request: Request) -> JSONResponse:
    """`status` is "ok", or "degraded" with `reasons` (store or queue unreachable: HTTP 503; tasks
    waiting with no live worker, or a worker without progress: HTTP 200). The running tasks' ids
    show only with the API key (Authorization header) where one is configured."""
    settings = settings_of(request)
    keyed = bool(settings.api_key) and header_is_valid(settings, request)
    data, serving = await run_in_threadpool(health_data, settings, backend_of(request), keyed)
    return JSONResponse(wrap(data), status_code=200 if serving else 503)


@router.get("/v1/models", response_model=None, summary="Models this server serves",
            responses={**ok(Envelope[ModelInventory]), **error_responses(401)})
async def list_models(request: Request) -> Enveloped:
    settings = settings_of(request)
    require_header(settings, request)
    return wrap(await run_in_threadpool(model_list, settings, backend_of(request)))


def stats(settings: Settings, backend: Backend, recent: Optional[list[TaskRecord]] = None) -> dict[str, Any]:
    counts = backend.store.counts()
    jobs = {k: int(counts.get(k, 0)) for k in ("total", "queued", "running", "succeeded", "failed", "cancelled")}
    if recent is None:
        recent = backend.store.recent_finished(max(1, settings.avg_window))
    durations = [r.finished_at - r.started_at for r in recent if r.finished_at and r.started_at]
    avg = sum(durations) / len(durations) if durations else float(settings.avg_job_seconds)
    return {"version": __version__, "jobs": jobs, "queue_size": jobs["queued"], "queue_maxsize": settings.queue_maxsize,
            "avg_job_seconds": round(float(avg), 3), "recent": summarize(recent)}


@router.get("/v1/stats", response_model=None, summary="Queue and job statistics",
            responses={**ok(Envelope[dict[str, Any]]), **error_responses(401)})
async def get_stats(request: Request) -> Enveloped:
    """Upstream's fields plus `recent`: queue wait, run time, stage times and failures by reason over
    the last ACESTEP_AVG_WINDOW finished tasks."""
    settings = settings_of(request)
    require_header(settings, request)
    return wrap(await run_in_threadpool(stats, settings, backend_of(request)))


@router.get("/v1/metrics", summary="The same figures as Prometheus text", include_in_schema=True,
            responses={200: {"content": {prometheus.CONTENT_TYPE: {}}}, **error_responses(401)})
async def get_metrics(request: Request) -> Response:
    settings, backend = settings_of(request), backend_of(request)
    require_header(settings, request)

    def render() -> bytes:
        recent = backend.store.recent_finished(max(1, settings.avg_window))  # one read: stats and histograms
        data = stats(settings, backend, recent)
        report = check_health(backend, settings.stall_timeout)
        return prometheus.render(data, report, recent, backend.store)

    return Response(await run_in_threadpool(render), media_type=prometheus.CONTENT_TYPE)
