"""Pure decisions about one request (torch-free): seeds, task, duration, metas, batching key."""
from __future__ import annotations

import math
import secrets
from typing import Optional

from engine.request import GenerationRequest

# text2music with no duration and no audio codes: a fixed, documented length (upstream picks a random one).
DEFAULT_TEXT2MUSIC_SECONDS = 30.0
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")


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


def repaint_window(start: float, end: Optional[float], source_seconds: float) -> tuple[float, float, float, float]:
    """(pad_before_s, pad_after_s, start_s, end_s) in the padded source's time.

    end <= 0 or None means the end of the source; a negative start or an end past the source pads with silence
    (outpainting)."""
    if end is None or end <= 0:
        end = source_seconds
    pad_before = max(0.0, -start)
    pad_after = max(0.0, end - source_seconds)
    return pad_before, pad_after, start + pad_before, end + pad_before


def metas(request: GenerationRequest, duration_seconds: float) -> dict:
    return {
        "bpm": request.bpm if request.bpm is not None else "N/A",
        "duration": round(duration_seconds, 2),
        "genres": "N/A",  # only the 5 Hz LM produces genres; no LM runs in the engine
        "keyscale": request.key_scale or "N/A",
        "timesignature": request.time_signature or "N/A",
    }


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
            r.time_signature, r.instruction, r.use_tiled_decode)
