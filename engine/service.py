"""The Engine: loads every configured DiT once and turns GenerationRequests into encoded audio.

    engine = Engine.load(EngineConfig.from_env())
    result = engine.generate(request, src_audio=bytes_or_none, reference_audio=bytes_or_none, progress=cb)
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import quantize  # before diffusers, which imports torchao: its import warnings are hidden there
from diffusers import AceStepPipeline  # noqa: I001

from engine import audio_encode, audio_io, cpu_target, lm_bridge, memory, plan, source_codes, speedups, timing, vae_progress
from engine import cover_start, sampler
from engine.adapters import AdapterLibrary, local_adapter_bytes, model_shape
from engine.weights.checkpoints import (
    DEMO_NOTICE,
    SHAREABLE_COMPONENTS,
    is_xl_folder,
    read_marker,
    resolve_model,
    supported_task_types,
)
from engine.config import EngineConfig
from engine.weights.fingerprint import component_fingerprint
from engine import device_probe, offload
from engine import vae_fast, xl_timbre
from engine.request import MAX_BATCH, GenerationRequest
from engine.types import (
    DeviceReport,
    EncodedAudio,
    EngineInfo,
    GenerationCancelled,
    GenerationError,
    GenerationInfo,
    GenerationResult,
    ModelInfo,
    PendingAudio,
    ProgressCallback,
)

log = logging.getLogger("engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# Progress: preparing, diffusion steps, the VAE decode (reported from inside it, engine/vae_progress.py), encoding
# (per request of the batch). On CPU the decode is often the longest stage: it must feed the stall timer too.
_STEPS_FROM, _STEPS_TO = 0.05, 0.80
_DECODE_AT, _ENCODE_FROM = 0.80, 0.95
WARMUP_SECONDS = 10.0  # the shortest song a request may ask for
# What ACESTEP_QUANTIZE quantises in a pipeline: the DiT (its text encoder, VAE and condition encoder stay)
QUANTIZED_COMPONENTS = ("transformer",)


@dataclass
class LoadedModel:
    info: ModelInfo
    pipe: AceStepPipeline

    @property
    def random_weights(self) -> bool:
        return self.info.random_weights


@dataclass
class _Job:
    """One request, decoded and planned, ready to join a pipeline call."""
    request: GenerationRequest
    model: LoadedModel
    task: str
    instruction: str
    seeds: list[int]
    src: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    audio_duration: Optional[float] = None
    repaint: Optional[tuple[float, float]] = None
    notes: list[str] = field(default_factory=list)
    decode_s: float = 0.0
    vae_tiled: bool = False
    vae_on_cpu: bool = False  # offload's fallback: the decode's working set did not fit on the device
    lm_plan: Optional[object] = None  # engine.lm.types.LMPlan when the 5 Hz LM planned this request
    audio_codes: Optional[list[str]] = None  # per item, from the LM (else the request's own codes)
    adapters: list = field(default_factory=list)  # the adapters that acted on the DiT (AdapterLibrary.activate)
    adapter_s: float = 0.0  # loading/switching them before this call
    cover: Optional[cover_start.CoverStart] = None  # a cover that starts from its source renoised


class _PerItemNoiseSDEScheduler(sampler.ShapedEulerScheduler):
    """Euler flow matching with stochastic re-noising (x0 re-noised to the next sigma, diffusers'
    `stochastic_sampling`), drawing each batch item's noise from that item's own generator so its audio depends
    only on its seed."""

    generators = None

    def step(self, model_output, timestep, sample, *args, generator=None, **kwargs):
        return super().step(model_output, timestep, sample, *args, generator=generator or self.generators, **kwargs)


def _check_full_precision_load(config: EngineConfig, path: Path, dtype: str, reuse: dict, needed: int,
                               quantised: int, largest: int, free: Optional[int], device: torch.device,
                               what: str) -> None:
    """A quantised model loads at full precision and is quantised after (engine/quantize.py): while it loads,
    it holds its full-precision size, not the `quantised` size `needed` counts (2.9 GiB, not 1.5, for a 2B DiT)."""
    full = memory.weight_bytes(path, dtype, skip_components=reuse)
    full_largest = offload.largest_stage(offload.stage_bytes(path, dtype, reuse))
    memory.check_fits(offload.fit_bytes(config.offload, needed - quantised + full, max(largest, full_largest),
                                        device.type),
                      free, str(device), f"{what} (loaded in {dtype}, then quantised to {config.quantize})")


class Engine:
    def __init__(self, config: EngineConfig, models: dict[str, LoadedModel], device: torch.device,
                 dtype: torch.dtype, shared: dict[str, list[str]], planner=None):
        self.config = config
        self.planner = planner  # engine.lm.planner.Planner, or None: the DiT runs alone
        # Without it, requests that need the LM are refused by the worker before they run.
        self.lm_loaded = planner is not None
        self._models = models
        self.device = device
        self.dtype = dtype
        self.dtype_choice = f"set: {str(dtype).replace('torch.', '')}"  # why this dtype (load() says)
        # ACESTEP_OFFLOAD (engine/offload.py): load() decides; the offloader moves the stages when it is on
        self.offload = offload.Decision(False, "set: none (ACESTEP_OFFLOAD)", 0)
        self.offloader: Optional[offload.Offloader] = None
        self.shared_components = shared  # component -> model names using one shared object
        # LoRA/LoKr adapters: loaded into a model's DiT on first use, switched per batch (engine/adapters.py)
        self.adapters = AdapterLibrary(config.resolved_lora_dir, config.resolved_adapter_cache_dir,
                                       config.adapter_budget_mb * 2**20)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, config: EngineConfig) -> "Engine":
        device = resolve_device(config.device)
        dtype, dtype_choice = choose_dtype(config.dtype, device)
        log.info("dtype %s", dtype_choice)
        quantize.check_supported(config.quantize, device, "the DiT (ACESTEP_QUANTIZE)")
        if config.lm_model:
            quantize.check_supported(config.quantize_lm, device, "the 5 Hz LM (ACESTEP_QUANTIZE_LM)")
        by_fingerprint: dict[str, object] = {}
        users: dict[str, list[str]] = {}
        models: dict[str, LoadedModel] = {}
        free = memory.free_bytes(device)  # before loading anything: refuse at start, not on the first task
        # the adapters under ACESTEP_LORA_DIR, up to what the LRU may hold (uploads share the same bound)
        needed = adapters_bytes = min(local_adapter_bytes(config.resolved_lora_dir), config.adapter_budget_mb * 2**20)
        workspace = 0
        largest = 0  # the largest stage's weights: what must fit at once under offload
        dtype_bytes = torch.tensor([], dtype=dtype).element_size()
        for i, name in enumerate(config.model_names):
            path = resolve_model(config, name)
            reuse = {}
            prints = {}
            # fingerprints only decide what models share: one model has nothing to share (and hashes nothing)
            for comp in SHAREABLE_COMPONENTS if len(config.model_names) > 1 else ():
                fp = component_fingerprint(path / comp)
                if fp is None:
                    continue
                if comp == "condition_encoder" and is_xl_folder(path):  # its timbre encoder runs otherwise (xl_timbre)
                    fp += ":xl"
                prints[comp] = fp
                if (comp, fp) in by_fingerprint:
                    reuse[comp] = by_fingerprint[(comp, fp)]
            model_bytes = memory.weight_bytes(path, str(dtype).replace("torch.", ""), skip_components=reuse,
                                              quantize=config.quantize, quantized_components=QUANTIZED_COMPONENTS)
            needed += model_bytes
            workspace = max(workspace, memory.workspace_bytes(memory.decoder_channels(path), dtype_bytes))
            largest = max(largest, offload.largest_stage(offload.stage_bytes(
                path, str(dtype).replace("torch.", ""), reuse, quantize=config.quantize,
                quantized_components=QUANTIZED_COMPONENTS)))
            memory.check_fits(offload.fit_bytes(config.offload, needed, largest, device.type), free, str(device),
                              " + ".join(config.model_names[: i + 1])
                              + (" + adapters" if adapters_bytes else ""), workspace)
            if config.quantize != "none":
                _check_full_precision_load(config, path, str(dtype).replace("torch.", ""), reuse, needed,
                                           model_bytes, largest, free, device, " + ".join(config.model_names[: i + 1]))
            t0 = time.perf_counter()
            with _quiet_diffusers():  # it logs the full repr of every passed-in (shared) module
                pipe = AceStepPipeline.from_pretrained(str(path), dtype=dtype, **reuse)
            pipe.to(device if offload.load_on_device(config.offload, needed, workspace, free) else "cpu")
            pipe.set_progress_bar_config(disable=True)
            for comp in QUANTIZED_COMPONENTS:  # before compiling; a shared component was quantised once already
                if config.quantize != "none" and comp not in reuse:
                    layers = quantize.quantize_module(getattr(pipe, comp), config.quantize)
                    log.info("model %s: %s quantised to %s (%d Linear layers)", name, comp, config.quantize, layers)
            if config.stage_timings:
                timing.install_hooks(pipe)
            for applied in speedups.apply(pipe, compile_dit=config.compile_dit, cuda_graphs=config.cuda_graphs,
                                          compile_backend=config.compile_backend,
                                          attention_backend=config.attention_backend):
                log.info("model %s: %s", name, applied)
            vae_fast.prepare(pipe.vae, device, config.vae_compile)  # CPU: channels-last decode and encode, fused Snake (once per shared VAE)
            if xl_timbre.install(pipe):
                log.info("model %s: XL timbre encoder pools its special token, as upstream's XL", name)
            for comp, fp in prints.items():
                by_fingerprint.setdefault((comp, fp), getattr(pipe, comp))
                if comp in reuse:
                    users.setdefault(comp, [n for n in models if getattr(models[n].pipe, comp) is reuse[comp]])
                    users[comp].append(name)
            marker = read_marker(path)
            info = ModelInfo(
                name=name,
                is_default=(i == 0),
                random_weights=bool(marker and marker.get("random_weights")),
                task_types=supported_task_types(name, marker, is_turbo=bool(pipe.is_turbo)),
                path=str(path),
            )
            models[name] = LoadedModel(info=info, pipe=pipe)
            log.info("loaded model %s from %s in %.1fs (shared: %s)%s", name, path, time.perf_counter() - t0,
                     ", ".join(sorted(reuse)) or "none",
                     f" -- {DEMO_NOTICE.upper()}" if info.random_weights else "")
            if info.random_weights:
                log.warning("model %s is a RANDOM-WEIGHT DEMO checkpoint: %s", name, DEMO_NOTICE)
        lm_folder = lm_bridge.lm_folder(config)
        stage_largest, lm_bytes = largest, 0  # a vLLM LM stays on the device beside the largest DiT stage
        lm_cache = 0
        if lm_folder is not None:  # the LM shares the GPU with the DiTs
            lm_dtype = str(dtype).replace("torch.", "")  # the transformers LM loads in the DiT's dtype
            # its KV cache: the transformers backend's, at the full context (vLLM sizes its own from `left`)
            lm_cache = lm_bridge.transformers_kv_cache_bytes(config, lm_folder, dtype_bytes)
            lm_bytes = memory.weight_bytes(lm_folder, lm_dtype, quantize=config.quantize_lm) + lm_cache
            needed += lm_bytes
            largest = max(largest, lm_bytes)
            fit = offload.fit_bytes(config.offload, needed, largest, device.type)
            lm_counted = fit == needed or largest == lm_bytes  # under offload: the LM is the largest stage
            memory.check_fits(fit, free, str(device), " + ".join([*config.model_names, lm_folder.name]), workspace,
                              **_lm_cache_terms(lm_cache if lm_counted else 0))
        decision = offload.decide(config.offload, needed, largest, free, workspace, device.type)
        if not decision.offload:  # the loading checks asked for the largest stage only
            memory.check_fits(needed, free, str(device), " + ".join(config.model_names), workspace,
                              **_lm_cache_terms(lm_cache))
        if decision.offload:  # every stage home before the LM loads on the device
            for model in models.values():
                model.pipe.to("cpu")
        # what the fit check leaves beside the DiTs, their working memory and the text encoder: a vLLM LM's
        # weights, runtime and KV cache must fit in it (engine/lm/vllm_backend.kv_cache_bytes)
        left = None if free is None else free - workspace - (stage_largest if decision.offload else needed - lm_bytes)
        engine = cls(config, models, device, dtype, users,
                     planner=lm_bridge.load_planner(config, device, dtype, memory_left=left))
        engine.dtype_choice = dtype_choice
        engine._apply_offload(decision)
        if speedups.warm_up_enabled(config.warmup, device.type):
            engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One tiny generation per model (CUDA context, kernel selection, allocator, compilation), so the
        first task does not pay for them."""
        for name in self._models:
            t0 = time.perf_counter()
            self.generate(GenerationRequest(prompt="warm-up", lyrics="[instrumental]", audio_duration=WARMUP_SECONDS,
                                            inference_steps=2, seeds=[0], model=name, audio_format="wav"),
                          encode=False)
            log.info("warmed up model %s in %.1fs", name, time.perf_counter() - t0)

    def _apply_offload(self, decision: offload.Decision) -> None:
        """Offload on: every stage waits on the CPU and moves in as it runs; off: everything on the device."""
        self.offload = decision
        if decision.offload and self.config.cuda_graphs:  # graphs replay the addresses of weights that move
            raise GenerationError(f"offload ({decision.reason}) cannot run with CUDA graphs (ACESTEP_CUDA_GRAPHS): "
                                  "turn one of them off")
        if decision.offload:
            self.offloader = offload.install(self.device, {n: m.pipe for n, m in self._models.items()},
                                             getattr(self.planner, "backend", None))
        else:
            for model in self._models.values():
                model.pipe.to(self.device)
        log.info("offload %s", decision.reason)

    def _offload_info(self) -> dict:
        return {"mode": self.config.offload, "active": self.offload.offload, "reason": self.offload.reason}

    def _offload_start(self, model: LoadedModel, items: int, duration: Optional[float], tiled: bool) -> bool:
        """Before a pipeline call under offload: its text encoder on the device (the pipeline computes where its
        modules are), and the VAE decode on the CPU when its working set would not fit beside the VAE."""
        if self.offloader is None:
            return False
        keys = offload.pipeline_groups(model.info.name)
        on_cpu = offload.decode_on_cpu(
            offload.vae_decode_bytes(model.pipe, items, duration or audio_io.MAX_SOURCE_SECONDS, tiled),
            self.offloader.free_at_stage(keys["vae"], memory.available_bytes(self.device)))
        self.offloader.decode_home(keys["vae"], on_cpu)
        self.offloader.enter(keys["text_encoder"])
        return on_cpu

    # ---------------------------------------------------------------- introspection
    def models(self) -> list[ModelInfo]:
        return [m.info for m in self._models.values()]

    def model(self, name: Optional[str]) -> LoadedModel:
        key = name or self.config.default_model
        if key not in self._models:
            raise GenerationError(f"unknown model {key!r}; loaded models: {', '.join(self._models)}")
        return self._models[key]

    def describe(self) -> EngineInfo:
        random = any(m.random_weights for m in self._models.values())
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "dtype_choice": self.dtype_choice,
            "default_model": self.config.default_model,
            "models": [asdict(m.info) | {"task_types": list(m.info.task_types),
                                         "adapter_shape": model_shape(m.pipe).as_dict()} for m in self._models.values()],
            "random_weights": random,
            "notice": DEMO_NOTICE if random else None,
            "shared_components": self.shared_components,
            "lm_model": self.planner.backend.model_name if self.planner else "none",
            "lm_random_weights": self.planner.backend.random_weights if self.planner else None,
            "lm_dtype": self.planner.backend.dtype if self.planner else None,
            "lm_configured": self.config.lm_model,
            "offload": self._offload_info(),
            "quantization": self._quantization(),
            "loaded_adapters": self.adapters.loaded(),
            "local_adapters": self.adapters.list_local({n: model_shape(m.pipe) for n, m in self._models.items()}),
        }

    def devices(self) -> DeviceReport:
        """Where it runs, for the worker's heartbeat (engine/device_probe.py): the GPUs with their free memory now."""
        backend = self.planner.backend if self.planner else None
        lm_device = getattr(backend, "device", None)  # the transformers LM says; vLLM runs on the engine's card
        return device_probe.report(str(self.device), list(self._models), str(self.dtype).replace("torch.", ""),
                                   lm_model=backend.model_name if backend else None,
                                   lm_device=str(lm_device) if lm_device is not None else None,
                                   lm_dtype=backend.dtype if backend else None, quantization=self._quantization(),
                                   offload_mode=self.config.offload, offload_active=bool(self.offload.offload))

    def _quantization(self) -> dict[str, str]:
        """What ACESTEP_QUANTIZE did to each model's weights (engine/quantize.py)."""
        return {"dit": self.config.quantize, "lm": self.config.quantize_lm if self.planner else "none"}

    # ---------------------------------------------------------------- generation
    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None,
                 progress: Optional[ProgressCallback] = None, encode: bool = True) -> GenerationResult:
        """encode=False: the audio comes back unencoded in `result.pending`, for the caller to encode."""
        if request.full_analysis_only:
            return self._understand_source(request, src_audio, progress)
        lm_plan = None
        # The LM runs for what asks for it; a plain request keeps the DiT-only path (and its batching).
        if plan.lm_runs(request, self.planner is not None):
            share = _lm_share(request)  # of the task's progress: the LM's steps first, then the DiT's
            lm_plan = self.planner.plan(request, seeds=plan.resolve_seeds(request),
                                        progress=_scaled(progress, 0.0, share))
            if request.analysis_only:
                return lm_bridge.analysis_result(request, lm_plan, self.model(request.model).info.name)
            request = lm_bridge.request_for_dit(request, lm_plan)
            progress = _scaled(progress, share, 1.0)
        job = self._prepare(request, src_audio, reference_audio, lm_codes=bool(lm_plan is not None and lm_plan.codes))
        if lm_plan is not None:
            job.lm_plan = lm_plan
            job.audio_codes = lm_plan.audio_code_strings or None
        out = self._run([job], progress, encode)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def _understand_source(self, request: GenerationRequest, src_audio: Optional[bytes],
                           progress: Optional[ProgressCallback]) -> GenerationResult:
        """full_analysis_only: source audio -> the DiT's audio codes -> the LM's reading of them; no audio out."""
        if self.planner is None:
            raise GenerationError("full_analysis_only needs the 5 Hz LM, and this worker has none")
        if src_audio is None:
            raise GenerationError("full_analysis_only needs source audio (src_audio)")
        model = self.model(request.model)
        t0 = time.perf_counter()
        audio = audio_io.decode_audio(src_audio, "src_audio")
        _report(progress, 0.05, "encoding the source audio to 5 Hz codes")
        if self.offloader is not None:  # the VAE first: the codes are computed where its weights are
            self.offloader.enter(offload.pipeline_groups(model.info.name)["vae"])
        codes = source_codes.audio_to_codes(model.pipe, audio)
        encode_s = time.perf_counter() - t0
        seed = plan.resolve_seeds(request)[0]
        metadata, lyrics, text, stats = self.planner.understand(
            codes, seed=seed, constrained=request.constrained_decoding,
            progress=_scaled(progress, 0.1, 1.0))
        return lm_bridge.understanding_result(
            request, self.planner.backend, metadata=metadata, lyrics=lyrics, text=text, stats=stats,
            codes=codes, seed=seed, source_seconds=audio.shape[-1] / audio_io.SAMPLE_RATE, encode_s=encode_s,
            dit_model=model.info.name)

    def generate_batch(self, items: list[tuple[GenerationRequest, dict]],
                       progress: Optional[ProgressCallback] = None, encode: bool = True) -> list:
        """Run requests that share one plan.batch_key (the caller groups them) in one pipeline call.

        Each item is (request, {"src_audio": bytes|None, "reference_audio": bytes|None}). Returns, in
        order, a GenerationResult or the Exception that request failed with; a failing pipeline call
        is retried per request so one bad request does not fail the others. GenerationCancelled
        stops everything. Raises ValueError for items that cannot share a call.
        """
        if len(items) == 1:
            request, audio = items[0]
            try:
                return [self.generate(request, src_audio=(audio or {}).get("src_audio"),
                                      reference_audio=(audio or {}).get("reference_audio"), progress=progress,
                                      encode=encode)]
            except GenerationCancelled:
                raise
            except Exception as exc:
                return [exc]
        keys = {plan.batch_key(r, r.model or self.config.default_model, self.lm_loaded,
                               self.config.length_bucket_seconds) for r, _ in items}
        if len(keys) != 1 or None in keys:
            raise ValueError("generate_batch: these requests cannot share one pipeline call")
        if sum(r.batch_size for r, _ in items) > MAX_BATCH:
            raise ValueError(f"generate_batch: more than {MAX_BATCH} items in one call")
        results: list = [None] * len(items)
        jobs: dict[int, _Job] = {}
        for i, (request, _) in enumerate(items):
            try:
                jobs[i] = self._prepare(request, None, None)  # batchable requests have no source audio
            except Exception as exc:
                results[i] = exc
        ready = sorted(jobs)
        if not ready:
            return results
        try:
            outs = self._run([jobs[i] for i in ready], progress, encode)
        except GenerationCancelled:
            raise
        except Exception:
            outs = []
            for i in ready:  # isolate the failing request instead of failing the whole batch
                try:
                    outs.append(self._run([jobs[i]], progress, encode)[0])
                except GenerationCancelled:
                    raise
                except Exception as single_exc:
                    outs.append(single_exc)
        for i, out in zip(ready, outs):
            results[i] = out
        return results

    # ---------------------------------------------------------------- internals
    def _prepare(self, request: GenerationRequest, src_bytes: Optional[bytes],
                 ref_bytes: Optional[bytes], lm_codes: bool = False) -> _Job:
        """lm_codes: the request's audio codes are the 5 Hz LM's (not the client's)."""
        model = self.model(request.model)
        task = plan.effective_task(request)
        if request.task_type not in model.info.task_types:
            raise GenerationError(
                f"task_type {request.task_type!r} is not supported by model {model.info.name!r} "
                f"(supports: {', '.join(model.info.task_types)}); use a base/sft model for lego/extract/complete")
        # The pipeline's own table gives each task its instruction (placeholders filled from the track names).
        instruction = request.instruction or AceStepPipeline._get_task_instruction(
            task_type=task, track_name=request.track_name, complete_track_classes=request.complete_track_classes)
        if request.sampler_mode == "heun" and request.infer_method == "ode" and _guidance(model.pipe, request) > 1.0:
            raise GenerationError(
                f"sampler_mode 'heun' with guidance (guidance_scale {request.guidance_scale:g} on the non-turbo model "
                f"{model.info.name!r}) is not supported: upstream guides Heun's corrector with plain CFG, the diffusers "
                "pipeline applies APG at every evaluation; use guidance_scale 1, sampler_mode euler or a turbo model")
        job = _Job(request=request, model=model, task=task, instruction=instruction,
                   seeds=plan.resolve_seeds(request))
        if task != request.task_type:
            given = "the 5 Hz LM's audio codes" if lm_codes else "audio_code_string given"
            job.notes.append(f"{given}: ran as {task} (as upstream does)")
        t0 = time.perf_counter()
        if src_bytes is not None and request.task_type == "text2music":
            job.notes.append("src_audio ignored for text2music")  # not even decoded: only what runs is read
        elif src_bytes is not None:
            job.src = audio_io.decode_audio(src_bytes, "src_audio")
        if ref_bytes is not None:
            job.reference = audio_io.decode_audio(ref_bytes, "reference_audio")
        job.decode_s = time.perf_counter() - t0
        if request.task_type in plan.SOURCE_TASKS and job.src is None and not request.audio_code_string:
            raise GenerationError(f"task_type {request.task_type!r} needs src_audio, but none was given")
        if job.src is not None:
            self._plan_source(job)
        else:  # text2music, or cover from audio codes only (then the pipeline takes the codes' length)
            job.audio_duration = plan.text2music_seconds(request, demo=model.random_weights)
            if request.audio_duration is None and job.audio_duration is not None:
                job.notes.append(f"audio_duration not given: used the default {job.audio_duration:g} s" + (
                    f" (a random-weight demo model's; a real model's is {plan.DEFAULT_TEXT2MUSIC_SECONDS:g} s)"
                    if model.random_weights else ""))
        return job

    def _plan_source(self, job: _Job) -> None:
        r = job.request
        sr = audio_io.SAMPLE_RATE
        seconds = job.src.shape[-1] / sr
        fit = plan.fit_source(r, seconds)  # the API's cost ceiling counts the same length
        if job.task == "repaint":
            if fit.seconds > plan.MAX_OUTPUT_SECONDS:
                raise GenerationError(
                    f"repaint window {r.repainting_start:g}..{r.repainting_end} s on a {seconds:.1f} s source makes "
                    f"{fit.seconds:.1f} s of audio; the limit is {plan.MAX_OUTPUT_SECONDS:g} s")
            job.src = audio_io.pad_or_trim(job.src, round(fit.pad_before * sr), round(fit.pad_after * sr))
            job.repaint = fit.repaint
            if fit.pad_before or fit.pad_after:
                job.notes.append(f"outpainting: padded the source with {fit.pad_before:g} s before and "
                                 f"{fit.pad_after:g} s after")
            if r.audio_duration is not None:
                job.notes.append("audio_duration ignored for repaint: the output spans the (padded) source")
            return
        if fit.keep_seconds is not None:
            job.src = job.src[:, : round(fit.keep_seconds * sr)]
            job.notes.append(f"source trimmed to audio_duration {fit.keep_seconds:g} s")
        if job.task == "lego":
            job.repaint = (r.repainting_start, r.repainting_end if r.repainting_end and r.repainting_end > 0 else -1)

    def _run(self, jobs: list[_Job], progress: Optional[ProgressCallback],
             encode: bool = True) -> list[GenerationResult | GenerationError]:
        head = jobs[0]
        r = head.request
        pipe = head.model.pipe
        _report(progress, 0.0, "preparing")
        seeds = [s for j in jobs for s in j.seeds]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # CPU: same noise on any device
        prompts = [j.request.prompt for j in jobs for _ in j.seeds]
        lyrics = [j.request.lyrics for j in jobs for _ in j.seeds]
        languages = [j.request.vocal_language for j in jobs for _ in j.seeds]
        n_steps = len(r.timesteps) if r.timesteps else r.inference_steps
        start = head.cover = self._cover_start(head)  # covers are never batched: head is the only job
        if start is not None:
            n_steps = len(start.remaining)
        # the step each DiT evaluation belongs to (Heun evaluates twice a step), for progress and the last one
        evals = sampler.evaluations(n_steps, _sampler_mode(r), final_corrector=not pipe.is_turbo)
        # A length bucket batches songs of different lengths: the call runs at the longest (each is cut after).
        duration = max(j.audio_duration or 0.0 for j in jobs) if all(j.audio_duration for j in jobs) else head.audio_duration

        def on_step_end(_pipe, step, _t, tensors):
            _report(progress, _STEPS_FROM + (_STEPS_TO - _STEPS_FROM) * (step + 1) / len(evals),
                    f"diffusion step {evals[step]}/{n_steps}")
            if step + 1 == len(evals):  # the pipeline decodes the latents next
                decode.expect(int(tensors["latents"].shape[1]))  # [batch, frames, channels]
                if r.latent_rescale != 1.0 or r.latent_shift != 0.0:  # upstream's post-processing before the decode
                    tensors["latents"] = tensors["latents"] * r.latent_rescale + r.latent_shift
                _report(progress, _DECODE_AT, "VAE decode")
            return tensors

        def on_decoded(fraction: float) -> None:
            _report(progress, _DECODE_AT + (_ENCODE_FROM - _DECODE_AT) * fraction, "VAE decode")

        def on_source_encoded(fraction: float) -> None:  # before the first step, which reports _STEPS_FROM
            _report(progress, _STEPS_FROM * fraction, "VAE encode (source audio)")

        kwargs = dict(
            prompt=prompts, lyrics=lyrics, vocal_language=languages, audio_duration=duration,
            num_inference_steps=r.inference_steps, guidance_scale=_guidance(pipe, r), shift=r.shift,
            generator=generators, instruction=head.instruction, bpm=r.bpm, keyscale=r.key_scale or None,
            timesignature=r.time_signature or None, task_type=head.task, track_name=r.track_name,
            complete_track_classes=r.complete_track_classes, src_audio=_to(head.src, self.device),
            reference_audio=_to(head.reference, self.device), audio_codes=head.audio_codes or r.audio_code_string or None,
            audio_cover_strength=r.audio_cover_strength, cfg_interval_start=r.cfg_interval_start,
            cfg_interval_end=r.cfg_interval_end, timesteps=r.timesteps, callback_on_step_end=on_step_end,
            output_type="pt",
        )
        if head.repaint is not None:
            kwargs.update(repainting_start=head.repaint[0], repainting_end=head.repaint[1])

        t_adapters = time.perf_counter()
        acting = self.adapters.activate(head.model.info.name, pipe, r.adapters)  # the batch shares r.adapter_key
        for job in jobs:
            job.adapters, job.adapter_s = acting, time.perf_counter() - t_adapters
        clock = timing.StageClock(cuda=self.device.type == "cuda")
        tiled = self._tile_decode(pipe, r, len(seeds), duration, head)
        vae_on_cpu = self._offload_start(head.model, len(seeds), duration, tiled)
        t0 = time.perf_counter()
        with timing.recording(clock if self.config.stage_timings else None), \
                self._sampler(pipe, r, generators), _fixed_global_rng(self.device), \
                _tiled_decode(pipe, tiled), vae_progress.encoding(pipe.vae, on_source_encoded), \
                vae_progress.reporting(pipe.vae, on_decoded) as decode:
            if start is not None:
                with _fixed_global_rng(self.device):  # the same posterior draw as the pipeline's own encode next
                    clean = cover_start.source_latents(pipe, len(seeds), kwargs["src_audio"], kwargs["audio_codes"])
                kwargs.update(latents=cover_start.start_latents(start, clean, generators), timesteps=start.remaining)
            audio = pipe(**kwargs).audios
            if self.device.type == "cuda":  # one wait per call (the stage timings add none), so pipeline_s is whole
                torch.cuda.synchronize(self.device)
        pipeline_s = time.perf_counter() - t0
        for job in jobs:
            job.vae_tiled, job.vae_on_cpu = tiled, vae_on_cpu
            if job.audio_duration is not None and duration is not None and job.audio_duration < duration:
                job.notes.append(f"batched by length bucket: generated at {duration:g} s with longer songs and cut "
                                 f"to {job.audio_duration:g} s (a run alone with the same seed differs)")
        _report(progress, _ENCODE_FROM, "encoding audio")  # without `encode`, the caller encodes next

        results, offset = [], 0
        for job in jobs:
            part = audio[offset: offset + len(job.seeds)]
            offset += len(job.seeds)
            try:  # one request's bad output (NaN) fails that request only
                results.append(self._finish(job, part, clock, pipeline_s, len(jobs), len(seeds), encode))
            except GenerationError as exc:
                results.append(exc)
            if encode and offset < len(seeds):
                _report(progress, _ENCODE_FROM + (1.0 - _ENCODE_FROM) * offset / len(seeds), "encoding audio")
        _report(progress, 1.0, "done")
        return results

    def _finish(self, job: _Job, audio: torch.Tensor, clock: timing.StageClock, pipeline_s: float,
                n_requests: int, n_items: int, encode: bool = True) -> GenerationResult:
        r = job.request
        target = audio.shape[-1]
        if job.audio_duration is not None and job.src is None:
            # the pipeline rounds up to whole 25 Hz latent frames; cut to the asked length
            target = min(target, round(job.audio_duration * audio_io.SAMPLE_RATE))
        audio = audio[..., :target].float().cpu().numpy()
        audio_io.check_finite(audio)  # fails this task with the reason; the encoder never sees NaN
        seconds = target / audio_io.SAMPLE_RATE
        pending = [PendingAudio(samples=a, format=r.audio_format, sample_rate=audio_io.SAMPLE_RATE,
                                channels=a.shape[0], duration_seconds=seconds, seed=seed)
                   for a, seed in zip(audio, job.seeds)]
        encoded: list[EncodedAudio] = []
        encode_s = 0.0
        if encode:
            t0 = time.perf_counter()
            # libsndfile releases the GIL while encoding, so batch items encode in parallel (mp3 is the slow one)
            with ThreadPoolExecutor(max_workers=min(len(audio), os.cpu_count() or 1)) as pool:
                encoded = [e for e, _ in pool.map(audio_encode.encode_pending, pending)]
            encode_s = time.perf_counter() - t0
            pending = []
        info = self._generation_info(job, clock, pipeline_s, encode_s, n_requests, n_items)
        lm = job.lm_plan
        metas = lm_bridge.metas_of(lm, seconds) if lm is not None else plan.metas(r, seconds)
        return GenerationResult(audios=encoded, metas=metas, dit_model=job.model.info.name,
                                lm_model=getattr(lm, "model", "none") or "none", generation_info=info,
                                pending=pending)

    def _generation_info(self, job: _Job, clock: timing.StageClock, pipeline_s: float, encode_s: float,
                         n_requests: int, n_items: int) -> GenerationInfo:
        r, model = job.request, job.model
        notes = list(job.notes)
        guidance = _guidance(model.pipe, r)
        if guidance != r.guidance_scale:
            notes.append("guidance_scale ignored: turbo models are guidance-distilled (ran at 1.0)")
        if r.use_adg:
            notes.append("use_adg ignored: the diffusers pipeline implements APG guidance only")
        start = job.cover
        if start is not None:
            notes.append(f"cover_noise_strength {start.strength:g}: started at t={start.time:g} from the source "
                         f"renoised, ran the last {len(start.remaining)} of {len(start.schedule)} steps")
        elif r.cover_noise_strength > 0.0:
            notes.append(f"cover_noise_strength ignored: ran as {job.task} from noise (no source or codes to start from)")
        if r.sampler_mode != _sampler_mode(r):
            notes.append("sampler_mode heun ignored with infer_method sde: stochastic Euler steps (as upstream)")
        if job.lm_plan is None and (r.thinking or r.lm_model_path):
            if self.planner is None:
                notes.append("thinking/LM fields ignored: no 5 Hz LM runs in this engine (DiT only)")
            elif r.task_type in plan.SKIP_LM_TASKS:  # the only tasks the LM skips when thinking is on
                notes.append(f"thinking ignored: the 5 Hz LM plans no {r.task_type} task (as upstream)")
        stages = clock.rounded()
        hooked = sum(clock.seconds.values())
        timings = {
            "decode_input_s": round(job.decode_s, 4),
            "adapters_s": round(job.adapter_s, 4),
            **stages,
            "pipeline_other_s": round(max(0.0, pipeline_s - hooked), 4),
            "pipeline_s": round(pipeline_s, 4),
            "audio_encoding_s": round(encode_s, 4),
        }
        if n_requests > 1:
            notes.append(f"batched with {n_requests - 1} other request(s): pipeline timings cover all "
                         f"{n_items} items")
        info = {
            "model": model.info.name,
            "random_weights": model.random_weights,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "dtype_choice": self.dtype_choice,
            "task_type": r.task_type,
            "pipeline_task_type": job.task,
            "instruction": job.instruction,
            "steps": len(start.remaining) if start else len(r.timesteps) if r.timesteps else r.inference_steps,
            "cover_noise_strength": r.cover_noise_strength,
            "shift": r.shift,
            "guidance_scale": guidance,
            "infer_method": r.infer_method,
            "sampler_mode": _sampler_mode(r),
            "velocity_norm_threshold": r.velocity_norm_threshold,
            "velocity_ema_factor": r.velocity_ema_factor,
            "latent_shift": r.latent_shift,
            "latent_rescale": r.latent_rescale,
            "vae_decode": "tiled" if job.vae_tiled else "untiled",
            "vae_decode_device": "cpu" if job.vae_on_cpu else str(self.device),
            "offload": self._offload_info(),
            "seeds": list(job.seeds),
            "batch_size": len(job.seeds),
            "batched_requests": n_requests,
            "lm": "none",
            "lm_model": "none",
            "adapters": job.adapters,
            "quantization": self._quantization(),
            "timings": timings,
            "notes": notes,
        }
        if model.random_weights:
            info["notice"] = DEMO_NOTICE
        lm = job.lm_plan
        if lm is not None:  # what the LM chose, on what, how long, how many tokens
            lm_info = lm.info()  # type: ignore[attr-defined]
            info.update(lm_info, lm=lm_info["lm_backend"], caption=r.prompt)
            info["timings"] = {**lm.timings, **timings}  # type: ignore[attr-defined]
            info["notes"] = notes + list(lm.notes)  # type: ignore[attr-defined]
            info["random_weights"] = model.random_weights or lm_info["lm_random_weights"]
        return info

    def _tile_decode(self, pipe: AceStepPipeline, request: GenerationRequest, items: int,
                     duration: Optional[float], head: _Job) -> bool:
        """Tile the VAE decode only when the request allows it and an untiled one would not fit now."""
        if not request.use_tiled_decode:
            return False
        if duration is None:  # the length comes from the source or the audio codes
            duration = head.src.shape[-1] / audio_io.SAMPLE_RATE if head.src is not None else audio_io.MAX_SOURCE_SECONDS
        vae = pipe.vae.config
        channels = int(vae.decoder_channels) * int(vae.channel_multiples[0])
        dtype_bytes = torch.tensor([], dtype=pipe.vae.dtype).element_size()
        needed = memory.vae_decode_bytes(items, duration, channels, dtype_bytes)
        return memory.tile_vae_decode(True, needed, memory.available_bytes(self.device))

    @staticmethod
    def _cover_start(job: _Job) -> Optional[cover_start.CoverStart]:
        """Where a cover asking for cover_noise_strength starts (None: from pure noise, every step)."""
        r = job.request
        if job.task != "cover" or r.cover_noise_strength <= 0.0:
            return None
        return cover_start.plan(job.model.pipe, r.cover_noise_strength, r.inference_steps, r.shift, r.timesteps)

    @contextlib.contextmanager
    def _sampler(self, pipe: AceStepPipeline, request: GenerationRequest, generators: list):
        """The scheduler of this call (engine/sampler.py): the pipeline's own Euler one when the request asks
        for nothing else; else a stochastic one (sde), Heun's, or Euler's with the velocity controls."""
        mode = _sampler_mode(request)
        shaping = sampler.VelocityShaping(request.velocity_norm_threshold, request.velocity_ema_factor)
        if request.infer_method == "ode" and mode == "euler" and shaping == sampler.VelocityShaping():
            yield
            return
        original = pipe.scheduler
        if request.infer_method == "sde":
            swapped = _PerItemNoiseSDEScheduler.from_config(original.config, stochastic_sampling=True)
            swapped.generators, swapped.shaping = generators, shaping
        else:
            swapped = sampler.scheduler_for(original, mode, shaping, final_corrector=not pipe.is_turbo)
        pipe.scheduler = swapped
        try:
            yield
        finally:
            pipe.scheduler = original


def resolve_device(name: str) -> torch.device:
    if name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return choose_dtype(name, device)[0]


def choose_dtype(name: str, device: torch.device, flags: Optional[set[str]] = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for ACESTEP_DTYPE `name`; on CPU, auto is bf16 where the CPU computes it natively
    (engine/cpu_target.py; `flags`: its feature flags, read from /proc/cpuinfo when None)."""
    if name in ("", "auto"):
        if device.type == "cuda":
            dtype = device_probe.auto_cuda_dtype()  # bf16, emulated below 8.0: float16 gives NaN there
            return dtype, f"auto: {str(dtype).replace('torch.', '')} on CUDA"
        if device.type == "cpu":
            chosen, why = cpu_target.auto_cpu_dtype(cpu_target.cpu_flags() if flags is None else flags)
            return _DTYPES[chosen], why
        return torch.float32, f"auto: float32 on {device.type}"
    if name.lower() not in _DTYPES:
        raise GenerationError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name.lower()], f"set: {name} (ACESTEP_DTYPE)"


def _sampler_mode(request: GenerationRequest) -> str:
    """What integrates the steps: as upstream, Heun falls back to (stochastic) Euler under infer_method sde."""
    return "euler" if request.infer_method == "sde" else request.sampler_mode


def _guidance(pipe: AceStepPipeline, request: GenerationRequest) -> float:
    # Turbo DiTs are guidance-distilled; the pipeline would coerce to 1.0 with a warning per call.
    return 1.0 if pipe.is_turbo and request.guidance_scale > 1.0 else request.guidance_scale


def _lm_cache_terms(lm_cache: int) -> dict:
    """check_fits' arguments naming the transformers LM's KV cache within the bytes it checks."""
    from engine.lm.kv_budget import FIT_TERMS

    return {"lm_cache": lm_cache, "lm_cache_terms": FIT_TERMS} if lm_cache else {}


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _lm_share(request: GenerationRequest) -> float:
    """The part of a task's progress that is the 5 Hz LM's: all of it when no audio follows; half when it writes
    audio codes (most of a thinking task's time, and where upstream's progress puts the DiT's start); a
    quarter for sample/format/phase 1 alone."""
    if request.analysis_only:
        return 1.0
    return 0.5 if plan.lm_steps(request).codes else 0.25


def _scaled(progress: Optional[ProgressCallback], start: float, end: float) -> Optional[ProgressCallback]:
    """`progress` for a part of the task: its 0..1 maps to start..end."""
    if progress is None:
        return None
    report = progress
    return lambda fraction, stage: report(start + (end - start) * fraction, stage)


def _report(progress: Optional[ProgressCallback], fraction: float, stage: str) -> None:
    if progress is not None:
        progress(fraction, stage)  # may raise GenerationCancelled, which stops the pipeline mid-loop


def _to(audio: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if audio is None else audio.to(device)


@contextlib.contextmanager
def _fixed_global_rng(device: torch.device):
    """The VAE samples its posterior when encoding source/reference audio with the global RNG; fix it so results
    depend only on the inputs and seeds (the per-item noise uses explicit generators)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


@contextlib.contextmanager
def _tiled_decode(pipe: AceStepPipeline, tiled: bool):
    vae = pipe.vae
    previous = getattr(vae, "use_tiling", False)
    vae.use_tiling = bool(tiled)
    try:
        yield
    finally:
        vae.use_tiling = previous


__all__ = ["Engine", "LoadedModel", "choose_dtype", "resolve_device", "resolve_dtype"]
