"""Upstream's run-time model management: GET /v1/model_inventory, POST /v1/init, POST /v1/reinitialize.

One machine (embedded): /v1/init switches the workers' models at run time, as upstream's does. The wish is
recorded in the task store (service/model_set.py) and each worker loads it between batches (service/model_switch.py:
beside the old set when both fit, never mid-batch); the answer waits for the live workers, like upstream's, which
answers once the load is done: 200 loaded, 409 when it failed (the old set serves on), 202 when it is still loading
after `wait_seconds` (default INIT_WAIT_SECONDS) or no worker is alive to load it.

AWS: the models are the deploy's (the stack's `config_path` context, the workers' ACESTEP_CONFIG_PATH): /v1/init
for a model the fleet serves is done at once (200); anything else is a 409 that says which setting to deploy.
"""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from engine.adapter_manifest import published_shape
from service.config import Settings
from service.fleet import served_model_names, switch_state
from service.model_set import MODEL_NAME_PATTERN, ModelSet, WantedModels, ask_for, read_wanted
from service.observability.health import alive_only, healthy, unservable_reason
from service.ports import Backend
from service.refusals import ModelsFixed

from .auth import require_body_or_header, require_header, token_from_fields
from .body import read_body
from .deps import backend_of, settings_of
from .envelope import Enveloped, bad_request, wrap
from .openapi_bodies import FORM, JSON, error_responses, model_schema, request_body
from .openapi_responses import Envelope, ModelInventory, ok
from .routes_adapters import _conflict_responses, _validated
from .routes_info import model_list

router = APIRouter(tags=["info"])

INIT_WAIT_SECONDS = 120.0  # a full-size DiT loads in well under this on a GPU; longer answers 202 "loading"
POLL_SECONDS = 0.2


class InitModel(BaseModel):
    """Upstream's POST /v1/init body (`lm_backend`, `wait_seconds`: this server's)."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, max_length=200, description="a DiT model name (default: the slot's model)")
    slot: Optional[int] = Field(None, ge=1, le=3, description="which of the (up to 3) models it replaces; 1: the default")
    init_llm: bool = False
    lm_model_path: Optional[str] = Field(None, max_length=400)
    lm_backend: Optional[Literal["pt", "vllm", "auto"]] = None
    wait_seconds: Optional[float] = Field(None, ge=0, le=600, description="how long to wait for the load "
                                          f"(default {INIT_WAIT_SECONDS:g}); then 202 while it goes on")
    ai_token: Optional[str] = None


def how_to_change(settings: Settings, backend: Backend) -> str:
    if backend.name == "aws":
        return ("on AWS the workers' models are a deploy-time choice, not a request: set the CDK context "
                "`config_path` (in infra/: `npx cdk deploy -c config_path=<model>`, or `config_path` under `context` "
                "in infra/cdk.json; it becomes the workers' ACESTEP_CONFIG_PATH) and deploy; ECS replaces the "
                "workers one by one. A second and third model are `config_path2` / `config_path3`, the 5 Hz LM "
                "`init_llm=true` (and `lm_model_path`)")
    return ("the workers load their models when they start: restart the service with ACESTEP_CONFIG_PATH "
            "(and ACESTEP_CONFIG_PATH2/3, ACESTEP_INIT_LLM, ACESTEP_LM_MODEL_PATH) naming the models you want")


def _lm_served(inventory: dict[str, Any]) -> Optional[str]:
    return inventory.get("loaded_lm_model")


def _answer(inventory: dict[str, Any], message: str, slot: int, model: str, **extra: Any) -> dict[str, Any]:
    """Upstream's /v1/init data, plus this server's `model_switch` where a switch was asked for."""
    return {"message": message, "slot": slot, "loaded_model": model, "loaded_lm_model": _lm_served(inventory),
            "models": inventory["models"], "lm_models": inventory["lm_models"],
            "llm_initialized": inventory["llm_initialized"], **extra}


def init_fixed(settings: Settings, backend: Backend, form: InitModel) -> dict[str, Any]:
    """AWS: a model and LM the fleet already serves, else a 409 naming the deploy setting."""
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
    wanted_lm = _lm_name(form.lm_model_path)
    if (form.init_llm or wanted_lm) and not lm:
        raise ModelsFixed(f"the workers do not run the 5 Hz LM; {how_to_change(settings, backend)}")
    if wanted_lm and lm and wanted_lm != lm:
        raise ModelsFixed(f"the workers run the LM {lm!r}, not {wanted_lm!r}; {how_to_change(settings, backend)}")
    loaded = any(m["name"] == model and m.get("is_loaded") for m in inventory["models"])
    message = ("Model initialization completed: the fleet's workers have it loaded" if loaded else
               "Model initialization completed: the fleet serves it; a worker loads it when it starts")
    return _answer(inventory, message, form.slot or (served.index(model) + 1), model)


def _lm_name(path: Optional[str]) -> str:
    return (path or "").strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _loadable(settings: Settings, name: str) -> bool:
    """A folder under the checkpoint dir (or its demo), or a published ACE-Step 1.5 DiT the worker can download
    (or stand in for with a labelled random-weight demo, ACESTEP_DEMO_IF_MISSING)."""
    root = Path(settings.checkpoint_dir)
    if (root / name).is_dir() or (root / ".demo" / name).is_dir():
        return True
    return published_shape(name) is not None and (settings.allow_download or settings.demo_if_missing)


def wanted_set(settings: Settings, backend: Backend, form: InitModel) -> tuple[ModelSet, int, bool]:
    """The set this /v1/init asks for, the slot it set, and whether that is what serves already."""
    served = served_model_names(settings, backend)
    inventory = model_list(settings, backend)
    slot = form.slot or 1
    model = (form.model or "").strip() or (served[slot - 1] if slot <= len(served) else "")
    if not model:
        raise bad_request(f"slot {slot} has no model on this server: name one in `model`")
    if not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise bad_request(f"model {model[:80]!r}: a model's name (a folder under the checkpoint dir), not a path")
    if slot > len(served) + 1:
        raise bad_request(f"slot {slot}: this server serves {len(served)} model(s); the next free slot is "
                          f"{len(served) + 1}")
    names = list(served)
    names[slot - 1:slot] = [model]
    names = list(dict.fromkeys(names))
    slot = names.index(model) + 1  # a model named into another slot it already holds stays where it was
    for name in names:
        if name not in served and not _loadable(settings, name):
            raise ModelsFixed(f"no model {name!r} here to load: it is not under {settings.checkpoint_dir} and not a "
                              "published ACE-Step 1.5 model (fetch one with `acestep-models download <name>`, or put "
                              "its folder there) -- or " + how_to_change(settings, backend))
    wish = read_wanted(backend.store, settings)
    state = switch_state(settings, backend)
    kept = wish if wish is not None and state is not None and state["state"] != "failed" else None
    lm = bool(kept.lm) if kept else bool(inventory["llm_initialized"])
    lm_model, lm_backend = (kept.lm_model, kept.lm_backend) if kept else (None, None)
    wanted_lm = _lm_name(form.lm_model_path)
    if wanted_lm:
        if not re.fullmatch(MODEL_NAME_PATTERN, wanted_lm):
            raise bad_request(f"lm_model_path {wanted_lm[:80]!r}: an LM's name (a folder under the checkpoint dir)")
        lm, lm_model = True, wanted_lm
    elif form.init_llm:
        lm = True
    wanted = ModelSet(models=names, lm=lm, lm_model=lm_model, lm_backend=form.lm_backend or lm_backend)
    same_lm = lm == bool(inventory["llm_initialized"]) and (not wanted_lm or wanted_lm == _lm_served(inventory))
    serving = names == served and same_lm and not form.lm_backend and (state is None or state["state"] == "loaded")
    return wanted, slot, serving


def start_switch(settings: Settings, backend: Backend, form: InitModel) -> tuple[Optional[WantedModels], dict[str, Any]]:
    """(the wish recorded, None when nothing is to load; the answer for that case)."""
    wanted, slot, serving = wanted_set(settings, backend, form)
    if serving:
        inventory = model_list(settings, backend)
        return None, _answer(inventory, "Model initialization completed", slot,
                             wanted.models[slot - 1])
    state = switch_state(settings, backend)  # asked again after it failed: one more attempt, as upstream's init
    return ask_for(backend.store, settings, wanted, retry=state is not None and state["state"] == "failed"), {}


def retry_failed(settings: Settings, backend: Backend) -> Optional[WantedModels]:
    """The last wish recorded again when it failed to load (each worker tries it once more), else None."""
    wish, state = read_wanted(backend.store, settings), switch_state(settings, backend)
    if wish is None or state is None or state["state"] != "failed":
        return None
    return ask_for(backend.store, settings, ModelSet(**wish.model_dump(include=set(ModelSet.model_fields))),
                   retry=True)


def switch_answer(settings: Settings, backend: Backend, wish: WantedModels, slot: int) -> tuple[int, dict[str, Any]]:
    """(HTTP status, data) for the wish as the live workers stand: 200 loaded, 202 loading/waiting, 409 failed."""
    state = switch_state(settings, backend) or {"state": "waiting"}
    inventory = model_list(settings, backend)
    model = wish.models[slot - 1]
    if state.get("version", wish.version) != wish.version:  # a later /v1/init replaced this one
        state = {**state, "state": "replaced"}
    if state["state"] == "failed":
        errors = "; ".join(f"{w}: {e}" for w, e in dict(state["errors"]).items())  # type: ignore[call-overload]
        served = ", ".join(m["name"] for m in inventory["models"])
        raise ModelsFixed(f"Model initialization failed to load {wish.describe()} ({errors}); the workers still "
                          f"serve {served}. Fix the cause and POST /v1/init again")
    if state["state"] == "loaded":
        return 200, _answer(inventory, "Model initialization completed", slot, model, model_switch=state)
    message = {"waiting": "Model initialization recorded: no worker is running; the next one to start loads it",
               "replaced": "Model initialization superseded by a later POST /v1/init"}.get(
        str(state["state"]), "Model initialization in progress: the workers load it between tasks; "
                             "GET /v1/model_inventory shows when it is loaded")
    return 202, _answer(inventory, message, slot, model, status="loading", model_switch=state)


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
    "/v1/init": {409: ("deploy", "restart", "no model", "failed to load")},
    "/v1/reinitialize": {409: ("deploy", "restart", "failed to load")},
}

_INVENTORY_DOC = ("Upstream's model inventory: each DiT model with `is_loaded` (a live worker has it) and "
                  "`supported_task_types`, the LM models, `llm_initialized`. Same as GET /v1/models.")


@router.get("/v1/model_inventory", response_model=None,
            summary="Models and whether the fleet has them loaded", description=_INVENTORY_DOC,
            responses={**ok(Envelope[ModelInventory]), **error_responses(401)})
async def model_inventory(request: Request) -> Enveloped:
    settings = settings_of(request)
    require_header(settings, request)
    return wrap(await run_in_threadpool(model_list, settings, backend_of(request)))


_INIT_DOC = ("Switches the served models, as upstream's does. One machine: the workers load the set between "
             "tasks and the answer waits for them: 200 loaded, 409 failed to load (the old set serves on), 202 "
             "still loading after `wait_seconds` (or no worker running). Tasks already queued for a model it "
             "replaces fail with reason `model_unloaded`. AWS: only the deployed models (409 names the setting).")


@router.post("/v1/init", response_model=None, summary="Initialize or switch the DiT/LM models", description=_INIT_DOC,
             openapi_extra=request_body(model_schema(InitModel), JSON, FORM, required=False),
             responses={**ok(Envelope[dict[str, Any]]),
                        202: {"model": Envelope[dict[str, Any]], "description": "recorded, still loading"},
                        **_conflict_responses(400, 401, 409)})
async def init_model(request: Request) -> Enveloped | JSONResponse:
    settings, backend = settings_of(request), backend_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    form = _validated(InitModel, {k: v for k, v in body.fields.items() if v not in (None, "")})
    if backend.name == "aws":
        return wrap(await run_in_threadpool(init_fixed, settings, backend, form))
    wish, answer = await run_in_threadpool(start_switch, settings, backend, form)
    if wish is None:
        return wrap(answer)
    return await _answer_when_loaded(settings, backend, wish, form.slot or 1, form.wait_seconds)


async def _answer_when_loaded(settings: Settings, backend: Backend, wish: WantedModels, slot: int,
                              wait_seconds: Optional[float]) -> JSONResponse:
    """switch_answer once the live workers have loaded `wish` or failed to, or after `wait_seconds` (202)."""
    deadline = time.monotonic() + (INIT_WAIT_SECONDS if wait_seconds is None else wait_seconds)
    while True:  # the event loop stays free: each look is a store read in a thread
        status, data = await run_in_threadpool(switch_answer, settings, backend, wish, slot)
        if status != 202 or data["model_switch"]["state"] != "loading" or time.monotonic() >= deadline:
            return JSONResponse(wrap(data, code=status), status_code=status)
        await asyncio.sleep(POLL_SECONDS)


class Reinitialize(BaseModel):
    model_config = ConfigDict(extra="ignore")

    wait_seconds: Optional[float] = Field(None, ge=0, le=600, description="after a failed POST /v1/init: how long "
                                          f"to wait for its retry (default {INIT_WAIT_SECONDS:g}); then 202")
    ai_token: Optional[str] = None


@router.post("/v1/reinitialize", response_model=None,
             summary="Reload released models; retry a POST /v1/init that failed to load",
             openapi_extra=request_body(model_schema(Reinitialize), JSON, FORM, required=False),
             responses={**ok(Envelope[dict[str, Any]]),
                        202: {"model": Envelope[dict[str, Any]], "description": "retry recorded, still loading"},
                        **_conflict_responses(400, 401, 409)})
async def reinitialize_models(request: Request) -> Enveloped | JSONResponse:
    """Upstream reloads models it released from memory; workers here never release them. After a POST /v1/init
    whose set failed to load (one machine), the workers try that set once more, answered as /v1/init answers.
    409 when every live worker failed to load its models (a restart is what helps)."""
    settings, backend = settings_of(request), backend_of(request)
    body = await read_body(request, settings, empty_ok=True)
    require_body_or_header(settings, request, token_from_fields(body.fields))
    form = _validated(Reinitialize, {k: v for k, v in body.fields.items() if v not in (None, "")})
    wish = await run_in_threadpool(retry_failed, settings, backend) if backend.name != "aws" else None
    if wish is not None:
        return await _answer_when_loaded(settings, backend, wish, 1, form.wait_seconds)
    return wrap(await run_in_threadpool(reinitialize, settings, backend))


__all__ = ["router"]
