"""GET /health, GET /v1/models, GET /v1/stats."""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.ports import Backend
from service.records import MODELS_META_KEY, ModelsMeta

from .auth import require_header
from .deps import backend_of, settings_of
from .envelope import wrap

log = logging.getLogger("acestep.api")
router = APIRouter(tags=["info"])


def _models_meta(backend: Backend) -> Optional[ModelsMeta]:
    try:
        return ModelsMeta.parse(backend.store.get_meta(MODELS_META_KEY))
    except Exception:  # the API keeps answering when the store is briefly unavailable
        log.warning("could not read the models meta", exc_info=True)
        return None


def model_list(settings: Settings, backend: Backend) -> dict:
    """`{models: [{name, is_default, random_weights, task_types?}], default_model, ...}`.

    Names come from the settings; random_weights/task_types from what the worker recorded at
    startup (null before any worker has started).
    """
    meta = _models_meta(backend)
    default = settings.default_model
    models = []
    for name in settings.model_names:
        info = meta.find(name) if meta else None
        entry = {"name": name, "is_default": name == default,
                 "random_weights": info.random_weights if info else None}
        if info and info.task_types:
            entry["task_types"] = list(info.task_types)
        models.append(entry)
    out = {"models": models, "default_model": default}
    if meta:
        out["lm_model"] = meta.lm_model
        out["device"] = meta.device
        out["updated_at"] = meta.updated_at
    return out


@router.get("/health", summary="Health check (no auth)")
async def health(request: Request):
    settings, backend = settings_of(request), backend_of(request)
    listing = await run_in_threadpool(model_list, settings, backend)
    models = [{"name": m["name"], "is_default": m["is_default"], "random_weights": m["random_weights"]}
              for m in listing["models"]]
    return wrap({"status": "ok", "service": "ACE-Step API", "version": "1.0", "backend": backend.name,
                 "models": models, "demo": any(m["random_weights"] for m in models)})


@router.get("/v1/models", summary="Models this server serves")
async def list_models(request: Request):
    settings = settings_of(request)
    require_header(settings, request)
    return wrap(await run_in_threadpool(model_list, settings, backend_of(request)))


def stats(settings: Settings, backend: Backend) -> dict:
    counts = backend.store.counts()
    jobs = {k: int(counts.get(k, 0)) for k in ("total", "queued", "running", "succeeded", "failed")}
    durations = [d for d in backend.store.recent_durations(max(1, settings.avg_window)) if d is not None]
    avg = sum(durations) / len(durations) if durations else float(settings.avg_job_seconds)
    return {"jobs": jobs, "queue_size": jobs["queued"], "queue_maxsize": settings.queue_maxsize,
            "avg_job_seconds": round(float(avg), 3)}


@router.get("/v1/stats", summary="Queue and job statistics")
async def get_stats(request: Request):
    settings = settings_of(request)
    require_header(settings, request)
    return wrap(await run_in_threadpool(stats, settings, backend_of(request)))
