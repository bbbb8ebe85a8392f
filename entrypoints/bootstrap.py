"""Wiring: settings -> backend -> API app, engine, worker.

The one module that knows every layer. The API and the worker receive their backend (and the
worker its engine) from here, so nothing below the entry points reaches back up.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional

from service.config import Settings
from service.ports import Backend, GenerationEngine

if TYPE_CHECKING:  # each is imported where it is built: the API process loads no engine, the worker no FastAPI
    from fastapi import FastAPI

    from engine.config import EngineConfig
    from service.broken_worker import BrokenWorker
    from service.model_switch import ModelSwitch
    from service.observability.metrics import MetricsSink
    from service.webhooks import WebhookNotifier
    from service.worker import Worker

log = logging.getLogger(__name__)


def resolve_secrets(settings: Settings) -> Settings:
    """On AWS the API key (and a hub token) may live in Secrets Manager / SSM; read them once at start-up.
    The settings to use from then on (with that key)."""
    if settings.backend == "aws":
        from service.aws.secrets import resolve_hub_token, resolve_secret_env

        settings = resolve_secret_env(settings)
        resolve_hub_token(settings)
    return settings


def build_backend(settings: Settings) -> Backend:
    """The storage/queue adapters named by the settings."""
    if settings.backend == "aws":
        from service.aws import make_aws_backend  # boto3 only when asked for

        return make_aws_backend(settings)
    from service.embedded import make_embedded_backend

    return make_embedded_backend(settings)


def build_app(settings: Settings, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app on `backend` (built from the settings when not given), with its submit use case."""
    from handlers.app import create_app
    from service.submitter import Submitter

    backend = backend if backend is not None else build_backend(settings)
    return create_app(settings, backend, submitter=Submitter(settings, backend))


def build_openrouter_app(settings: Settings, api_app: FastAPI) -> FastAPI:
    """The OpenAI-compatible API (POST /v1/chat/completions) beside the ACE-Step API app `api_app`: the
    same backend, the same per-caller rate buckets and submitter (one count per caller, one view of the
    fleet), the same request-body memory budget, and the same webhook sender."""
    from handlers.openrouter import create_openrouter_app

    state = api_app.state
    return create_openrouter_app(settings, state.backend, rate_buckets=state.rate_buckets,
                                 body_budget=state.body_budget, submitter=state.submitter, webhooks=state.webhooks)


def engine_config(settings: Settings) -> EngineConfig:
    from engine.config import EngineConfig

    return EngineConfig(
        checkpoint_dir=settings.checkpoint_dir,
        model_names=settings.model_names,
        device=settings.device,
        dtype=settings.dtype,
        allow_download=settings.allow_download,
        lm_model=None,  # chosen by choose_lm once the DiTs are known to be real or demo
        lm_backend=settings.lm_backend,
        stage_timings=settings.stage_timings,
        warmup=settings.warmup,
        length_bucket_seconds=settings.batch_length_bucket,
        compile_dit=settings.compile_dit,
        cuda_graphs=settings.cuda_graphs,
        compile_backend=settings.compile_backend,
        attention_backend=settings.attention_backend,
        lora_dir=settings.resolved_lora_dir,
        adapter_cache_dir=settings.resolved_adapter_cache_dir,
        adapter_budget_mb=settings.adapter_cache_mb,
        quantize=settings.dit_quantization,
        quantize_lm=settings.lm_quantization,
        offload=settings.offload,
        vae_compile=settings.vae_compile,
        lm_kv_cache=settings.lm_kv_cache,
    )


DEFAULT_LM = "acestep-5Hz-lm-1.7B"


def choose_lm(settings: Settings, demo_dits: list[str]) -> str | None:
    """Which 5 Hz LM the engine loads (ACESTEP_INIT_LLM: true, false, or auto): a name under the
    checkpoint dir, a path, or None.

    auto: the LM when its folder is there; with demo DiTs, a demo LM (in <checkpoint dir>/.demo/), so a
    machine without weights still runs thinking end to end (labelled as random weights everywhere).
    true: the LM (downloaded at the first start), or a clear error at start when it is missing (a demo
    one when demos are allowed; its real download is then retried in the background at each start).
    """
    return _choose_lm(settings, demo_dits)[0]


def _choose_lm(settings: Settings, demo_dits: list[str]) -> tuple[str | None, bool]:
    """(the LM to load, whether its real download should be retried in the background)."""
    from pathlib import Path

    from engine.weights import model_sources
    from engine.weights.checkpoints import DEMO_DIR, move_demo_aside
    from engine.lm.folders import ensure_demo_lm, is_lm_folder, resolve_lm_folder
    from engine.lm.tiny import is_random_lm

    if settings.init_llm == "false":  # the settings read every spelling of ACESTEP_INIT_LLM as true/false/auto
        return None, False
    name = settings.lm_model_path or DEFAULT_LM
    required = settings.init_llm == "true"
    can_download = name in model_sources.KNOWN and engine_config(settings).downloads_possible()
    if can_download and required:  # a demo in the real LM's folder (an older version put it there) steps aside
        move_demo_aside(settings.checkpoint_dir, name)
    found = resolve_lm_folder(settings.checkpoint_dir, name)
    if found is not None and (not is_random_lm(found) or required or demo_dits):
        return name, False  # real weights; or, offline, a demo in its place (labelled), never beside real DiTs
    demo = Path(settings.checkpoint_dir) / DEMO_DIR / Path(name).name
    had_demo = is_lm_folder(demo)
    if required and not had_demo and _download_lm(settings, name):  # the first start waits for it
        return name, False
    if settings.demo_if_missing and (required or demo_dits):
        # 1,024 code tokens instead of 64,000: any code is valid DiT input, and the demo decodes ~5x faster
        ensure_demo_lm(demo.parent, demo.name, audio_codes=1024)
        return str(demo), required and had_demo and can_download
    return (name if required else None), False


def load_engine(settings: Settings) -> GenerationEngine:
    """Load the DiT models once (with random-weight demo stand-ins for missing weights, if so configured).

    A demo never takes a real model's place: it lives in <checkpoint dir>/.demo/<name>, and while one is
    served the real download is retried in the background at each start (engine/weights/demo_models.py); the
    real weights are used from the next start.

    Typed as the port the worker uses: mypy (`make test`) checks engine.service.Engine against
    GenerationEngine structurally here (engine/ does not import service/, so Engine cannot
    subclass it).
    """
    from engine.weights.checkpoints import ModelNotFound, ensure_demo_models, local_layout
    from engine.weights.demo_models import BackgroundDownloads, StartPlan, plan_start
    from engine.service import Engine

    config = engine_config(settings)
    if settings.models_mirror:
        fetch_mirrored_models(settings)
    plan = plan_start(config) if settings.demo_if_missing else StartPlan()
    _warn_demo(plan.demo, settings)
    config.lm_model, lm_retry = _choose_lm(settings, plan.demo)
    try:
        engine = Engine.load(config)
    except ModelNotFound as exc:
        if not settings.demo_if_missing:
            raise
        # The download was possible in principle but failed (no network): demos now, another try next start.
        log.error("%s", exc)
        missing = [n for n in config.model_names
                   if local_layout(config.checkpoint_dir, n) is None and n not in config.demo_models]
        built = ensure_demo_models(config, missing)
        _warn_demo(built, settings)
        plan.demo += built
        config.lm_model, _ = _choose_lm(settings, plan.demo)
        engine = Engine.load(config)
    BackgroundDownloads(settings.checkpoint_dir, plan.retry,
                        [settings.lm_model_path or DEFAULT_LM] if lm_retry else []).start()
    return engine


def fetch_mirrored_models(settings: Settings) -> None:
    """Bring each configured model from the stack's S3 mirror onto local disk (no-op when present)."""
    from pathlib import Path

    from service.aws import model_mirror
    from service.aws.clients import aws_client

    s3 = aws_client("s3", settings)
    for name in settings.model_names:
        fetched = model_mirror.fetch(s3, settings.bucket, name, Path(settings.checkpoint_dir) / name)
        if fetched is None:
            log.warning("model %s is not in the S3 mirror (s3://%s/%s); publish it with "
                        "`acestep-models publish %s`", name, settings.bucket, model_mirror.model_prefix(name), name)


def _warn_demo(names: list[str], settings: Settings) -> None:
    for name in names:
        log.warning("serving a RANDOM-WEIGHT demo model %r: its audio is noise. Run `acestep-models download "
                    "%s` (real weights go to %s/%s and take its place) to generate music.",
                    name, name, settings.checkpoint_dir, name)


def _download_lm(settings: Settings, name: str) -> bool:
    """Fetch a known LM from its published source when downloads are possible; False otherwise."""
    from pathlib import Path

    from engine.weights import model_sources

    config = engine_config(settings)
    if name not in model_sources.KNOWN or not config.downloads_possible():
        return False
    try:
        model_sources.download(model_sources.source_for(name), Path(settings.checkpoint_dir))
    except model_sources.DownloadFailed as exc:
        log.error("5 Hz LM: %s", exc)
        return False
    return True


def build_worker(settings: Settings, engine: GenerationEngine | None = None, backend: Backend | None = None,
                 on_stalled: Optional[Callable[[], None]] = None,
                 on_finished: Optional[Callable[[str], None]] = None) -> Worker:
    """A worker on the configured backend with a loaded engine (`on_finished`: see build_webhooks).
    With the pipeline on it gets encoder processes: close them with `worker.encoder.close()`."""
    from engine.encoder_pool import EncoderPool
    from service.worker import Worker, pipeline_enabled

    backend = backend if backend is not None else build_backend(settings)
    switch = model_switch(settings, backend)
    if engine is None:  # one machine after POST /v1/init: the wished set, loaded directly (model_switch.py)
        engine, settings = switch.load_at_start() if switch is not None else (load_engine(settings), settings)
    return Worker(settings, backend, engine,
                  on_stalled=on_stalled, metrics=build_metrics(settings), on_busy=scale_in_protection(settings),
                  on_finished=on_finished, model_switch=switch,
                  encoder=EncoderPool(settings.encode_processes) if pipeline_enabled(settings, engine) else None)


def model_switch(settings: Settings, backend: Backend) -> Optional[ModelSwitch]:
    """On one machine POST /v1/init switches the workers' models between batches (service/model_switch.py),
    loaded as at start (load_engine: local, downloaded, or a labelled demo). On AWS the set is the deploy's."""
    if settings.backend != "embedded":
        return None
    from engine.memory import DoesNotFit
    from service.model_switch import ModelSwitch

    return ModelSwitch(settings, backend.store, _load_for_switch, does_not_fit=(DoesNotFit,))


def _load_for_switch(settings: Settings) -> GenerationEngine:
    import sys

    torch = sys.modules.get("torch")  # memory a dropped engine left in CUDA's cache counts as free again
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return load_engine(settings)


def build_webhooks(settings: Settings, backend: Backend) -> WebhookNotifier:
    """Sends each finished task's result to its webhook_url, off the caller's thread (service/webhooks).

    Hand its `task_finished` to the worker (`on_finished`); the tasks the backend itself ends
    (dead-lettered) reach it through `backend.on_task_ended`, set here. It starts reading the outbox
    at once: deliveries left pending by a process that stopped are taken up without waiting for a task.
    """
    from service.task_payload import build_notifier

    notifier = build_notifier(settings, backend)
    backend.on_task_ended = notifier.task_finished
    notifier.start()
    return notifier


def scale_in_protection(settings: Settings) -> Optional[Callable[[bool], None]]:
    """On ECS (the agent sets ECS_AGENT_URI): protect the task from scale-in while it runs a task."""
    if settings.backend != "aws":
        return None
    from service.aws.task_protection import EcsTaskProtection

    protection = EcsTaskProtection.from_environment(settings.generation_timeout)
    return protection.set_busy if protection is not None else None


def build_broken_worker(settings: Settings, backend: Backend, error: BaseException,
                        on_finished: Optional[Callable[[str], None]] = None) -> BrokenWorker:
    """The stand-in for a worker whose engine failed to load (see service/broken_worker.py)."""
    from service.broken_worker import BrokenWorker

    metrics = build_metrics(settings)
    metrics.worker_load_failed()
    return BrokenWorker(settings, backend, f"{type(error).__name__}: {error}", on_finished=on_finished,
                        metrics=metrics)  # the tasks it fails count as a worker's would


def build_metrics(settings: Settings) -> MetricsSink:
    """CloudWatch EMF on AWS; embedded deployments read the same figures from the store (/v1/stats)."""
    from service.observability.metrics import EmfMetrics, NoMetrics

    return EmfMetrics() if settings.backend == "aws" else NoMetrics()


def app_from_env() -> FastAPI:
    """`uvicorn --factory entrypoints.bootstrap:app_from_env`: settings from the environment / .env."""
    from service.config import load_settings

    return build_app(resolve_secrets(load_settings()))
