"""Pure decisions about one request (torch-free): seeds, task, duration, metas, batching key, and how much
work it makes (the seconds the DiT generates, the steps the 5 Hz LM decodes).

The engine decides a request's length with these functions, and the API's cost ceiling counts with the
same ones (service/task_limits.py), so what is admitted is what runs.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Optional

from engine.request import GenerationRequest
from engine.types import Metas

# text2music with no duration and no audio codes: a fixed, documented length, upstream's default since its
# #961 (120 s; it was 30 s here before).
DEFAULT_TEXT2MUSIC_SECONDS = 120.0
# What a random-weight demo model renders instead (DiT, and the demo LM's choice): noise either way, and the
# first-run demo stays fast (on 2 loaded CPU cores the demo DiT took 177 s for 120 s, 8 s for 30 s). Notes say so.
DEMO_SECONDS = 30.0
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")
# The longest audio any task makes: audio_duration's limit, 3,000 codes at 5 Hz, the longest source and
# the longest padded repaint.
MAX_OUTPUT_SECONDS = 600.0
CODES_PER_SECOND = 5
# The 5 Hz LM's caps (engine.lm.planner's defaults): a phase that never emits its stop token runs to these.
LM_MAX_COT_TOKENS = 1024
LM_MAX_LYRICS_TOKENS = 2048
LM_MAX_CODES = int(MAX_OUTPUT_SECONDS) * CODES_PER_SECOND
LM_UNCONSTRAINED_EXTRA_CODES = 500  # upstream's unconstrained codes cap: the target + 500
SKIP_LM_TASKS = ("cover", "repaint")  # upstream runs no LM for these
USER_FIELDS = ("bpm", "keyscale", "timesignature", "duration")  # all four given: phase 1 is skipped


def resolve_seeds(request: GenerationRequest) -> list[int]:
    """One seed per batch item: explicit seeds are honoured in order (-1 = random for that item); missing
    items get first_seed + i;
    no seeds at all -> fresh random seeds (also when use_random_seed is false: there is nothing to repeat)."""
    n = request.batch_size
    given = list(request.seeds or [])[:n]
    if not given:
        return [secrets.randbelow(2**32) for _ in range(n)]
    filled = given + [(given[0] + i) % 2**32 if given[0] >= 0 else -1 for i in range(len(given), n)]
    return [s if s >= 0 else secrets.randbelow(2**32) for s in filled]  # -1: random for that item


def reads_source_audio(request: GenerationRequest) -> bool:
    """Whether the source audio (src_audio) is used: by the source tasks and by full_analysis_only, which
    analyses it; text2music ignores it."""
    return request.task_type != "text2music" or request.full_analysis_only


def effective_task(request: GenerationRequest) -> str:
    """Audio codes turn text2music into cover (as upstream's handler and the diffusers pipeline do)."""
    if request.task_type == "text2music" and request.audio_code_string:
        return "cover"
    return request.task_type


def text2music_seconds(request: GenerationRequest, demo: bool = False) -> Optional[float]:
    """The length asked of a request without source audio: its audio_duration, else the default (DEMO_SECONDS
    on a random-weight demo model); None when its audio codes set the length (the pipeline generates as many
    seconds as there are codes / 5)."""
    if request.audio_duration is not None:
        return request.audio_duration
    if request.audio_code_string:
        return None
    return DEMO_SECONDS if demo else DEFAULT_TEXT2MUSIC_SECONDS


def code_count(request: GenerationRequest) -> int:
    """The number of 5 Hz codes in audio_code_string (validated as `<|audio_code_N|>` tokens)."""
    return request.audio_code_string.count("<|audio_code_")


@dataclass(frozen=True)
class SourceFit:
    """How a source of known length becomes the DiT's input, and how long that input then is."""
    seconds: float  # the length generated: the padded or cut source
    pad_before: float = 0.0  # repaint outpainting: silence added before / after the source
    pad_after: float = 0.0
    repaint: Optional[tuple[float, float]] = None  # the repaint window in the padded source's time
    keep_seconds: Optional[float] = None  # cut the source to its first keep_seconds (audio_duration)


def fit_source(request: GenerationRequest, source_seconds: float) -> SourceFit:
    """A repaint spans the whole padded source (audio_duration does not shorten it); the other source tasks
    cut the source to audio_duration when that is shorter."""
    if effective_task(request) == "repaint":
        before, after, start, end = repaint_window(request.repainting_start, request.repainting_end, source_seconds)
        return SourceFit(source_seconds + before + after, before, after, (start, end))
    if request.audio_duration is not None and request.audio_duration < source_seconds:
        return SourceFit(request.audio_duration, keep_seconds=request.audio_duration)
    return SourceFit(source_seconds)


def lm_runs(request: GenerationRequest, lm_loaded: bool) -> bool:
    """Whether an engine with (lm_loaded) or without the 5 Hz LM runs it for `request`."""
    if not lm_loaded:
        return False
    return request.full_analysis_only or ((request.thinking or request.needs_lm) and lm_steps(request).any)


def generated_seconds(request: GenerationRequest, source_seconds: Optional[float] = None,
                      lm: bool = False) -> float:
    """The seconds of audio the DiT generates for `request` (each diffusion step's work scales with them).

    source_seconds: the decoded source's length; None when not known yet (at submit), then the longest a
    source may be. lm: whether the 5 Hz LM plans the request first (it may choose the duration and write
    codes): then the longest it may choose. Audio codes set the length whatever audio_duration says (the
    output is cut to audio_duration after generating all of them)."""
    if request.analysis_only or request.full_analysis_only:
        return 0.0  # the LM's reading only: no diffusion
    if request.audio_code_string:
        return code_count(request) / CODES_PER_SECOND
    if lm and lm_runs(request, True) and lm_steps(request).codes:  # the LM writes the codes
        return lm_codes_per_item(request) / CODES_PER_SECOND
    has_source = request.task_type in SOURCE_TASKS and (source_seconds is not None or bool(request.src_audio_key))
    if has_source:
        chosen_by_lm = lm and lm_runs(request, True)  # the LM's duration replaces audio_duration
        asked = request.model_copy(update={"audio_duration": None}) if chosen_by_lm else request
        if source_seconds is None:  # any source up to the longest the engine takes (a repaint pads up to it)
            return min(fit_source(asked, MAX_OUTPUT_SECONDS).seconds, MAX_OUTPUT_SECONDS)
        return fit_source(asked, source_seconds).seconds
    if lm and lm_runs(request, True) and (request.audio_duration is None or lm_steps(request).sample):
        return MAX_OUTPUT_SECONDS  # the LM chooses the duration
    seconds = text2music_seconds(request)
    return DEFAULT_TEXT2MUSIC_SECONDS if seconds is None else seconds


@dataclass(frozen=True)
class LMSteps:
    sample: bool
    format: bool
    cot: bool  # phase 1 may run (skipped at run time when all four metas are known by then)
    codes: bool

    @property
    def any(self) -> bool:
        return self.sample or self.format or self.cot or self.codes


def is_sample_request(r: GenerationRequest) -> bool:
    return r.sample_mode or bool(r.sample_query.strip())


def lm_steps(r: GenerationRequest) -> LMSteps:
    """Which LM steps a request asks for (phase 1 also runs with thinking off, to fill missing metadata)."""
    lm_task = r.task_type not in SKIP_LM_TASKS
    codes = lm_task and r.thinking and not r.audio_code_string and not r.analysis_only
    return LMSteps(sample=is_sample_request(r), format=r.use_format, cot=lm_task, codes=codes)


def user_metadata(r: GenerationRequest) -> dict[str, Any]:
    """The metadata the user gave, in the LM's terms (forced verbatim into the metadata block)."""
    md: dict[str, Any] = {}
    if r.bpm is not None:
        md["bpm"] = int(r.bpm)
    if r.key_scale.strip() and r.key_scale.strip().lower() != "n/a":
        md["keyscale"] = r.key_scale.strip()
    if r.time_signature:
        md["timesignature"] = r.time_signature
    if r.audio_duration is not None and r.audio_duration > 0:
        md["duration"] = int(r.audio_duration)
    return md


def has_all_metas(md: dict[str, Any]) -> bool:
    return all(md.get(k) not in (None, "") for k in USER_FIELDS)


def target_codes(duration: Optional[float]) -> Optional[int]:
    """Phase 2's exact code count for a known duration (clamped to the LM's 10-600 s)."""
    if duration is None or duration <= 0:
        return None
    return int(min(max(float(duration), 10.0), MAX_OUTPUT_SECONDS) * CODES_PER_SECOND)


def lm_decode_steps(request: GenerationRequest) -> int:
    """The most decode steps the 5 Hz LM runs for `request`, each phase to its cap (a random-weight LM never
    emits a stop token, so it does). A batch's items and CFG's unconditional twins decode in the same steps,
    so they add none; allow_lm_batch=false decodes the items' codes one after another."""
    understand = LM_MAX_COT_TOKENS + LM_MAX_LYRICS_TOKENS + 2  # a metadata block, then free-text lyrics
    if request.full_analysis_only:
        return understand
    steps = lm_steps(request)
    total = understand if steps.sample else 0
    total += understand if steps.format else 0
    if steps.cot and not steps.sample and not has_all_metas(user_metadata(request)):
        total += LM_MAX_COT_TOKENS
    if steps.codes:
        total += (lm_codes_per_item(request) + 1) * (1 if request.allow_lm_batch else request.batch_size)
    return total


def lm_codes_per_item(request: GenerationRequest) -> int:
    """The most codes phase 2 writes per item: the user's duration x 5 exactly (constrained; upstream's cap of
    that + 500 unconstrained); as many as the LM's longest duration when the LM chooses it."""
    target = None if lm_steps(request).sample else target_codes(request.audio_duration)
    if target is None:
        return LM_MAX_CODES
    return target if request.constrained_decoding else target + LM_UNCONSTRAINED_EXTRA_CODES


def repaint_window(start: float, end: Optional[float], source_seconds: float) -> tuple[float, float, float, float]:
    """(pad_before_s, pad_after_s, start_s, end_s) in the padded source's time.

    end <= 0 or None means the end of the source; a negative start or an end past the source pads with silence
    (outpainting)."""
    if end is None or end <= 0:
        end = source_seconds
    pad_before = max(0.0, -start)
    pad_after = max(0.0, end - source_seconds)
    return pad_before, pad_after, start + pad_before, end + pad_before


def metas(request: GenerationRequest, duration_seconds: float) -> Metas:
    """The DiT-only path's metas: what the request gave (no genres: only the 5 Hz LM writes them)."""
    return Metas(bpm=request.bpm, duration=round(duration_seconds, 2), key_scale=request.key_scale or None,
                 time_signature=request.time_signature or None)


def length_bucket(seconds: float, bucket_seconds: float) -> float:
    """The batching key for a song length: the length itself (bucket 0), else the upper end of its
    bucket ((0, b], (b, 2b], ...): the length the batch is generated at when its longest song fills it."""
    if bucket_seconds <= 0:
        return seconds
    return math.ceil(seconds / bucket_seconds) * bucket_seconds


def batch_key(request: GenerationRequest, model: str, lm_loaded: bool = False,
              bucket_seconds: float = 0.0) -> Optional[tuple]:
    """Requests with equal keys can share one pipeline call; None means "run alone".

    Only plain text2music batches: one pipeline call takes per-item prompt, lyrics and language but a single
    duration, metadata, instruction and sampler setting for the whole batch. With the 5 Hz LM loaded, a
    request the LM plans (thinking, sample/format/analysis) runs alone: its metadata is only known once
    the LM has run. With `bucket_seconds`, songs whose lengths share a bucket batch together: the call
    runs at the longest and each is cut to its own length (so its audio differs from a run alone).
    """
    r = request
    if r.task_type != "text2music" or r.audio_code_string or r.src_audio_key or r.reference_audio_key:
        return None
    if lm_loaded and (r.thinking or r.needs_lm):
        return None
    return (model, length_bucket(r.audio_duration or DEFAULT_TEXT2MUSIC_SECONDS, bucket_seconds), r.inference_steps, r.guidance_scale, r.shift,
            r.infer_method, tuple(r.timesteps or ()), r.cfg_interval_start, r.cfg_interval_end, r.bpm, r.key_scale,
            r.time_signature, r.instruction, r.use_tiled_decode, r.adapter_key,
            r.sampler_mode, r.velocity_norm_threshold, r.velocity_ema_factor, r.latent_shift, r.latent_rescale)
