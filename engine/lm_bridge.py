"""Between the 5 Hz LM's plan and the DiT: loading the planner, what a plan changes in the request the
DiT runs, and the result of a request that wants the plan alone (analysis_only)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from engine.config import EngineConfig
from engine.lm.planner import Planner  # torch-free
from engine.plan import DEMO_SECONDS
from engine.request import GenerationRequest
from engine.types import GenerationError, GenerationResult, Metas

log = logging.getLogger(__name__)

# A random-weight LM never writes a stop token, so each phase runs to its cap: with the published caps a sample
# takes minutes on a CPU (bench/demo_lm.py). The demo LM gets small caps instead (its output is noise either
# way), so every `make run` path answers in seconds; results say so (DEMO_LM_NOTE). The metadata cap leaves
# room for every field line (the genres line alone may take 64 tokens), so the block still parses.
DEMO_LM_BUDGETS = {"max_caption_tokens": 16, "max_cot_tokens": 128, "max_lyrics_tokens": 32}
# The length a demo LM's song gets when the request leaves it to the LM: a demo model's length, not the default
# (120 s), so first-run songs stay short (the demo LM decodes 5 codes a second to its cap); the plan's notes say so.
DEMO_LM_SECONDS = DEMO_SECONDS
DEMO_LM_NOTE = (f"demo: the random-weight 5 Hz LM ran with small token caps (caption "
                f"{DEMO_LM_BUDGETS['max_caption_tokens']}, metadata {DEMO_LM_BUDGETS['max_cot_tokens']}, lyrics "
                f"{DEMO_LM_BUDGETS['max_lyrics_tokens']}) so it answers in seconds")


def lm_folder(config: EngineConfig) -> Optional[Path]:
    from engine.lm.folders import resolve_lm_folder

    return resolve_lm_folder(config.checkpoint_dir, config.lm_model) if config.lm_model else None


def transformers_kv_cache_bytes(config: EngineConfig, folder: Path, dtype_bytes: int) -> int:
    """The KV cache the fit check counts for the LM at `folder` on the transformers backend (engine/lm/kv_budget:
    the same length its decodes allocate at most); 0 when vLLM runs it, which sizes its own cache from what the
    fit check leaves."""
    from engine.lm.backend_choice import vllm_installed
    from engine.lm.kv_budget import fit_cache_bytes, read_config

    choice = (config.lm_backend or "auto").strip().lower()
    if choice == "vllm" or (choice == "auto" and vllm_installed()):
        return 0
    return fit_cache_bytes(read_config(folder), dtype_bytes)


def load_planner(config: EngineConfig, device, dtype=None, memory_left: Optional[int] = None):
    """The planner for config.lm_model (a folder name under the checkpoint dir, or a path); None without one.

    dtype: the transformers LM's (the DiT's ACESTEP_DTYPE choice); None: its own auto choice.
    memory_left: what the engine's fit check leaves on the device beside the DiT (vLLM sizes its KV cache from
    it; None: unknown)."""
    if not config.lm_model:
        return None
    from engine.lm.backend_choice import LMBackendUnavailable, quantize_refusal, resolve_backend

    folder = lm_folder(config)
    if folder is None:
        raise GenerationError(f"5 Hz LM {config.lm_model!r} not found (looked for it as a path and under "
                              f"{config.checkpoint_dir}); set ACESTEP_LM_MODEL_PATH to an LM folder, or "
                              f"ACESTEP_INIT_LLM=false to run the DiT alone")
    try:
        backend = resolve_backend(config.lm_backend)
    except LMBackendUnavailable as exc:
        raise GenerationError(str(exc)) from exc
    refusal = quantize_refusal(backend, config.quantize_lm)
    if refusal:
        raise GenerationError(refusal)
    if backend == "vllm":
        from engine.lm.vllm_backend import VllmLM, VllmMemoryError  # imports vLLM: only here, only when asked for

        # the KV cache from what the fit check leaves beside the DiT, not vLLM's default 90% of the card
        kv = os.environ.get("ACESTEP_VLLM_KV_CACHE_GB", "").strip()
        try:
            lm = VllmLM.load(folder, kv_cache_gib=float(kv) if kv else None, memory_left=memory_left)
        except VllmMemoryError as exc:  # refused at start with the numbers, as the DiT's fit check does
            raise GenerationError(str(exc)) from exc
    else:
        from engine.lm.transformers_backend import TransformersLM

        lm = TransformersLM.load(folder, quantize=config.quantize_lm, device=device, dtype=dtype,
                                 kv_cache=config.lm_kv_cache)
    # A random-weight LM was already announced by the backend's load (a warning): not repeated here.
    log.info("loaded 5 Hz LM %s from %s (%s)", lm.model_name, folder, lm.name)
    if not lm.random_weights:
        return Planner(lm)
    # The demo LM would pick random song lengths; it renders DEMO_LM_SECONDS instead.
    log.warning("5 Hz LM %s: demo token caps %s (a random-weight LM runs every phase to its cap)",
                lm.model_name, DEMO_LM_BUDGETS)
    return DemoPlanner(lm, demo_seconds=DEMO_LM_SECONDS,
                       max_caption_tokens=DEMO_LM_BUDGETS["max_caption_tokens"],
                       max_cot_tokens=DEMO_LM_BUDGETS["max_cot_tokens"],
                       max_lyrics_tokens=DEMO_LM_BUDGETS["max_lyrics_tokens"])


class DemoPlanner(Planner):
    """The planner of a random-weight LM: small caps (DEMO_LM_BUDGETS), and every plan says so."""

    def plan(self, *args, **kwargs):
        lm_plan = super().plan(*args, **kwargs)
        lm_plan.notes.append(DEMO_LM_NOTE)
        return lm_plan


def request_for_dit(r: GenerationRequest, plan) -> GenerationRequest:
    """The request with the plan's caption, lyrics, metadata, seeds and first item's codes (user values kept)."""
    md = plan.metadata
    update: dict = {"prompt": plan.caption, "lyrics": plan.lyrics, "seeds": list(plan.seeds)}
    if md.get("bpm") is not None:
        update["bpm"] = int(md["bpm"])
    if md.get("keyscale"):
        update["key_scale"] = str(md["keyscale"])
    if md.get("timesignature"):
        update["time_signature"] = str(md["timesignature"])
    if md.get("duration") is not None:
        update["audio_duration"] = float(md["duration"])
    if r.use_cot_language and md.get("language") and md["language"] != "unknown":
        update["vocal_language"] = str(md["language"])
    if plan.codes:
        update["audio_code_string"] = plan.audio_code_strings[0]  # each item's own codes go to the pipeline
    return GenerationRequest.model_validate({**r.model_dump(), **update})


def _number(value: Any) -> Optional[float]:
    """A number the LM wrote; text it wrote where a number belongs is not one (a source read without
    constraints may have it)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def metas_of(plan, duration_seconds: Optional[float]) -> Metas:
    md = plan.metadata  # the LM's names (its vocabulary): keyscale, timesignature
    return Metas(bpm=_number(md.get("bpm")),
                 duration=round(duration_seconds, 2) if duration_seconds is not None else _number(md.get("duration")),
                 genres=_text(md.get("genres")), key_scale=_text(md.get("keyscale")),
                 time_signature=_text(md.get("timesignature")))


def analysis_result(r: GenerationRequest, plan, dit_model: str) -> GenerationResult:
    """analysis_only: the LM's metadata (and caption/lyrics), no audio."""
    info = {"task_type": r.task_type, "analysis_only": True, "caption": plan.caption, "lyrics": plan.lyrics,
            "random_weights": plan.random_weights, "notes": list(plan.notes), **plan.info()}
    return GenerationResult(audios=[], metas=metas_of(plan, None), dit_model=dit_model, lm_model=plan.model,
                            generation_info=info)


def understanding_result(r: GenerationRequest, backend, *, metadata: dict, lyrics: str, text: str, stats,
                         codes: list[int], seed: int, source_seconds: float, encode_s: float,
                         dit_model: str) -> GenerationResult:
    """full_analysis_only: what the LM read from the source's audio codes (metadata, caption, lyrics), no audio.

    metas carry the source's measured duration; the LM's own guess stays in lm_metadata."""
    from engine.lm.types import LMPlan

    plan = LMPlan(metadata=dict(metadata), lm_metadata=dict(metadata), caption=str(metadata.get("caption", "")),
                  lyrics=lyrics, lyrics_rewritten=bool(lyrics), codes=[], seeds=[seed], phases=[stats],
                  lm_text=text, model=backend.model_name, backend=backend.name,
                  random_weights=backend.random_weights, dtype=backend.dtype)
    if backend.random_weights:
        plan.notes.append(DEMO_LM_NOTE)
    result = analysis_result(r, plan, dit_model)
    result.metas = metas_of(plan, source_seconds)
    result.generation_info.update(full_analysis_only=True, source_codes=len(codes),
                                  source_seconds=round(source_seconds, 3), encode_source_s=round(encode_s, 4),
                                  language=metadata.get("language", "unknown"))
    return result
