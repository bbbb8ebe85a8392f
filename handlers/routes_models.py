"""Upstream's run-time model management: GET /v1/model_inventory, POST /v1/init, POST /v1/reinitialize.

Here the models are the fleet's, chosen when its workers start (ACESTEP_CONFIG_PATH[2|3], ACESTEP_LM_MODEL_PATH
and ACESTEP_INIT_LLM; on AWS the stack's settings, applied by a deploy). So these answer what the fleet does:
/v1/init for a model and LM the fleet already serves is done at once (200, upstream's shape); for anything else
it is a 409 that says how to get it: a deploy on AWS, a restart with other settings on one machine. Loading
a model into running workers on request is not done: a worker holds one model set for its life, sized by its
fit check at start, and a switch would stall every task queued for the models it drops.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.observability.health import alive_only, healthy, unservable_reason
from service.ports import Backend
from service.refusals import ModelsFixed

from .auth import require_body_or_header, require_header, token_from_fields
from .body import read_body
from .deps import backend_of, settings_of
from .envelope import wrap
from .openapi_bodies import FORM, JSON, error_responses, model_schema, request_body
from .openapi_responses import Envelope, ok
from .routes_adapters import _conflict_responses, _validated
from .routes_info import model_list

router = APIRouter(tags=["info"])


class InitModel(BaseModel):
    """Upstream's POST /v1/init body."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, max_length=200, description="a DiT model name (default: the default model)")
    slot: Optional[int] = Field(None, ge=1, le=3)
    init_llm: bool = False
    lm_model_path: Optional[str] = Field(None, max_length=400)
    ai_token: Optional[str] = None


def how_to_change(settings: Settings, backend: Backend) -> str:
    if backend.name == "aws":
        return ("on AWS the workers' models are a deploy-time choice: set them in the stack (the workers' "
                "ACESTEP_CONFIG_PATH, ACESTEP_CONFIG_PATH2/3, ACESTEP_LM_MODEL_PATH) and deploy; ECS replaces "
                "the workers one by one")
    return ("the workers load their models when they start: restart the service with ACESTEP_CONFIG_PATH "
            "(and ACESTEP_CONFIG_PATH2/3, ACESTEP_INIT_LLM, ACESTEP_LM_MODEL_PATH) naming the models you want")


def _lm_served(inventory: dict[str, Any]) -> Optional[str]:
    return inventory.get("loaded_lm_model")


def init_models(settings: Settings, backend: Backend, form: InitModel) -> dict[str, Any]:
    inventory = model_list(settings, backend)
    served = list(settings.model_names)
    model = form.model.strip() if form.model else (settings.default_model or "")
    if form.slot is not None and form.model is None:
        paths = [settings.config_path, settings.config_path2, settings.config_path3]
        model = served[form.slot - 1] if form.slot - 1 < len(served) and paths[form.slot - 1] else ""
        if not model:
            raise ModelsFixed(f"slot {form.slot} has no model on this server; {how_to_change(settings, backend)}")
    if model not in served:
        raise ModelsFixed(f"model {model!r} is not one this server's workers load (they load: "
                                 f"{', '.join(served)}); {how_to_change(settings, backend)}")
    lm = _lm_served(inventory)
    wanted_lm = (form.lm_model_path or "").strip().rstrip("/").rsplit("/", 1)[-1]
    if (form.init_llm or wanted_lm) and not lm:
        raise ModelsFixed(f"the workers do not run the 5 Hz LM; {how_to_change(settings, backend)}")
    if wanted_lm and lm and wanted_lm != lm:
        raise ModelsFixed(f"the workers run the LM {lm!r}, not {wanted_lm!r}; {how_to_change(settings, backend)}")
    loaded = any(m["name"] == model and m.get("is_loaded") for m in inventory["models"])
    message = ("Model initialization completed: the fleet's workers have it loaded" if loaded else
               "Model initialization completed: the fleet serves it; a worker loads it when it starts")
    return {"message": message, "slot": form.slot or (served.index(model) + 1), "loaded_model": model,
            "loaded_lm_model": lm, "models": inventory["models"], "lm_models": inventory["lm_models"],
            "llm_initialized": inventory["llm_initialized"]}


def reinitialize(settings: Settings, backend: Backend) -> dict[str, Any]:
    reason = unservable_reason(backend)
    if reason:
        raise ModelsFixed(f"{reason}; requests cannot reload a worker's models: "
                                 + how_to_change(settings, backend).split(": ", 1)[-1])
    live = healthy(alive_only(backend.store.heartbeats(), time.time()))
    return {"message": "Service reinitialized: the workers keep their models loaded between tasks, so there "
                       "was nothing to reload", "reloaded": [], "workers_alive": len(live)}


# Refusals of schema-valid requests: they depend on what the fleet runs (tests/test_openapi_conformance.py).
STATE_RULES: dict[str, dict[int, tuple[str, ...]]] = {
    "/v1/init": {409: ("deploy", "restart")},
    "/v1/reinitialize": {409: ("deploy", "restart")},
}

_INVENTORY_DOC = ("Upstream's model inventory: each DiT model with `is_loaded` (a live worker has it) and "
                  "`supported_task_types`, the LM models, `llm_initialized`. Same as GET /v1/models.")


@router.get("/v1/model_inventory", summary="Models and whether the fleet has them loaded", description=_INVENTORY_DOC,
            responses={**ok(Envelope[dict[str, Any]]), **error_responses(401)})
async def model_inventory(request: Request):
    settings = settings_of(request)
    require_header(settings, request)
    return wrap(await run_in_threadpool(model_list, settings, backend_of(request)))


@router.post("/v1/init", summary="Initialize a model (served models only: the fleet's set is chosen at start)",
             openapi_extra=request_body(model_schema(InitModel), JSON, FORM, required=False),
             responses={**ok(Envelope[dict[str, Any]]), **_conflict_responses(400, 401, 409)})
async def init_model(request: Request):
    """200 in upstream's shape for a model (and LM) the fleet serves; 409 with what to do for any other: on
    AWS a deploy, on one machine a restart with other ACESTEP_CONFIG_PATH settings."""
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    form = _validated(InitModel, {k: v for k, v in body.fields.items() if v not in (None, "")})
    return wrap(await run_in_threadpool(init_models, settings, backend_of(request), form))


@router.post("/v1/reinitialize", summary="Reload released models (nothing to do: workers keep them)",
             openapi_extra=request_body({"type": "object", "properties": {"ai_token": {"type": "string"}}},
                                        JSON, FORM, required=False),
             responses={**ok(Envelope[dict[str, Any]]), **_conflict_responses(401, 409)})
async def reinitialize_models(request: Request):
    """Upstream reloads models it released from memory; workers here never release them. 409 when every live
    worker failed to load its models (a restart is what helps)."""
    settings = settings_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    return wrap(await run_in_threadpool(reinitialize, settings, backend_of(request)))


__all__ = ["router"]
