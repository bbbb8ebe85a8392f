"""Canonical request values -> a GenerationRequest, read strictly (one pydantic validation).

`StrictRequest` is GenerationRequest plus the strict readers: unlike upstream, a value that cannot be
read as its type is an error naming the field, never a silent default; "" (or an empty list) means
the default. It validates canonical names only (handlers/aliases.py resolves upstream's names first).
It also knows upstream's newer fields that this engine cannot honour: each is accepted at upstream's
default only, and any other value is a 400 saying why (never silently ignored).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticUseDefault

from engine.request import GenerationRequest

BOOL_TRUE = {"true", "1", "yes", "y", "on"}
BOOL_FALSE = {"false", "0", "no", "n", "off"}
MAX_SEED = 2**32 - 1
MODEL_NAMES = "model_names"  # validation context: the models this server has (empty: any name)


# --- reading values: each returns None for "use the default" and raises ValueError for a bad value --

def shown(v: Any) -> str:
    """A client's value as an error message quotes it: at most 60 characters (a 400 must not echo a 1 MB field)."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def to_int(v: Any) -> Optional[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        if s == "":
            return None
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f.is_integer():
            return int(f)
    raise ValueError(f"must be an integer (got {shown(v)})")


def to_float(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        raise ValueError(f"must be a number (got {shown(v)})")
    if isinstance(v, (int, float)):
        try:
            f = float(v)
        except OverflowError:
            raise ValueError("must be a finite number (got a number that is too large)") from None
    elif isinstance(v, str):
        if v.strip() == "":
            return None
        try:
            f = float(v.strip())
        except ValueError:
            raise ValueError(f"must be a number (got {shown(v)})") from None
    else:
        raise ValueError(f"must be a number (got {shown(v)})")
    if not math.isfinite(f):
        raise ValueError(f"must be a finite number (got {shown(v)})")
    return f


def to_duration(v: Any) -> Optional[float]:
    """audio_duration: 0 or a negative value is upstream's "auto" (the LM or the source decides)."""
    f = to_float(v)
    return None if f is not None and f <= 0 else f


def to_bpm(v: Any) -> Optional[int]:
    """bpm: 0 (or -1) is upstream's "auto"."""
    n = to_int(v)
    return None if n in (0, -1) else n


def to_bool(v: Any) -> Optional[bool]:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s == "":
            return None
        if s in BOOL_TRUE:
            return True
        if s in BOOL_FALSE:
            return False
    raise ValueError(f"must be a boolean: true/false, 1/0, yes/no or on/off (got {shown(v)})")


def to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    raise ValueError(f"must be a string (got {type(v).__name__})")


def to_optstr(v: Any) -> Optional[str]:
    return to_str(v).strip() or None


def to_lower(v: Any) -> Optional[str]:
    return to_str(v).strip().lower() or None


def _split(v: str) -> list[str]:
    for sep in ("|", ";"):
        v = v.replace(sep, ",")
    return [p.strip() for p in v.split(",") if p.strip()]


def to_seeds(v: Any) -> Optional[list[int]]:
    """`seed`: an int, a list of ints, or "1,2,3"; -1 means random (for that item)."""
    hint = f"must be an integer 0-{MAX_SEED}, -1 for random, or a comma-separated list of them (got {shown(v)})"
    if isinstance(v, (list, tuple)):
        items = list(v)
    elif isinstance(v, str):
        if v.strip() == "":
            return None
        items = _split(v)
    else:
        items = [v]
    if not items or len(items) > 64:
        raise ValueError(hint)
    seeds: list[int] = []
    for item in items:
        try:
            n = to_int(item)
        except ValueError:
            raise ValueError(hint) from None
        if n is None or n < -1 or n > MAX_SEED:
            raise ValueError(hint)
        seeds.append(n)
    return seeds


def to_float_list(v: Any) -> Optional[list[float]]:
    hint = f"must be a list of numbers or a comma-separated string (got {shown(v)})"
    if isinstance(v, str):
        s = v.strip().strip("[]")
        if s == "":
            return None
        items: list[Any] = _split(s)
    elif isinstance(v, (list, tuple)):
        items = list(v)
    else:
        raise ValueError(hint)
    out = []
    for item in items:
        f = to_float(item)
        if f is None:
            raise ValueError(hint)
        out.append(f)
    return out or None


def to_str_list(v: Any) -> Optional[list[str]]:
    if isinstance(v, str):
        return _split(v) or None
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return [x.strip() for x in v if x.strip()] or None
    raise ValueError(f"must be a list of strings or a comma-separated string (got {shown(v)})")


def to_codes(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("a list must hold integer codes 0-63999")
        return ",".join(str(x) for x in v)
    return to_str(v)


_EMPTY = object()


def _parsed_json_text(v: Any, what: str) -> Any:
    """A form field's JSON text parsed (`_EMPTY` for blank text); any other value as it came."""
    if not isinstance(v, str):
        return v
    if not v.strip():
        return _EMPTY
    try:
        return json.loads(v)
    except (ValueError, RecursionError):
        raise ValueError(f"must be {what} or a JSON string of one") from None


def to_object(v: Any) -> Optional[dict[str, Any]]:
    """An object, also as a JSON string of one (a form field); empty means none."""
    v = _parsed_json_text(v, "an object")
    if v is _EMPTY:
        return None
    if isinstance(v, dict):
        return v or None
    raise ValueError(f"must be an object or a JSON string of one (got {type(v).__name__})")


def to_object_list(v: Any) -> Optional[list[Any]]:
    """A list of objects (adapters), also as a JSON string of one (a form field); empty means none."""
    v = _parsed_json_text(v, "a list of objects")
    if v is _EMPTY:
        return None
    if isinstance(v, (list, tuple)):
        return list(v)
    raise ValueError(f"must be a list of objects or a JSON string of one (got {type(v).__name__})")


_READERS: dict[Callable[[Any], Any], tuple[str, ...]] = {
    to_str: ("prompt", "lyrics", "key_scale", "time_signature", "vocal_language", "sample_query",
             "lm_negative_prompt"),
    to_optstr: ("instruction", "track_name", "model", "lm_model_path"),
    to_lower: ("task_type", "infer_method", "sampler_mode", "audio_format", "lm_backend"),
    to_int: ("inference_steps", "batch_size", "lm_top_k"),
    to_bpm: ("bpm",),
    to_duration: ("audio_duration",),
    to_float: ("guidance_scale", "shift", "cfg_interval_start", "cfg_interval_end",
               "audio_cover_strength", "cover_noise_strength", "repainting_start", "repainting_end", "lm_temperature",
               "lm_cfg_scale", "lm_top_p", "lm_repetition_penalty", "velocity_norm_threshold", "velocity_ema_factor",
               "latent_shift", "latent_rescale"),
    to_bool: ("use_adg", "use_tiled_decode", "use_random_seed", "thinking", "sample_mode", "use_format",
              "analysis_only", "full_analysis_only", "constrained_decoding", "constrained_decoding_debug",
              "use_cot_caption", "use_cot_language", "is_format_caption", "allow_lm_batch", "instrumental"),
    to_seeds: ("seeds",),
    to_float_list: ("timesteps",),
    to_str_list: ("complete_track_classes",),
    to_codes: ("audio_code_string",),
    to_object_list: ("adapters",),
}
READ_AS: dict[str, Callable[[Any], Any]] = {name: read for read, names in _READERS.items() for name in names}


# Upstream's newer fields (acestep/api release_task_models) that the diffusers AceStepPipeline this engine
# runs has no counterpart for: name -> (upstream's default, reader, why another value is refused).
_PIPELINE = "the diffusers AceStepPipeline this server runs"
UPSTREAM_ONLY: dict[str, tuple[Any, Callable[[Any], Any], str]] = {
    "global_caption": ("", to_optstr, "only upstream's SFT-stems lego checkpoint reads it (its Global/Local caption "
                                      "block); no model this engine loads is one"),
    "repaint_mode": ("balanced", to_lower, f"{_PIPELINE} repaints with one fixed mask (regenerate inside "
                                           "repainting_start..repainting_end, keep the source outside)"),
    "repaint_strength": (0.5, to_float, f"{_PIPELINE} repaints with one fixed mask"),
    "repaint_latent_crossfade_frames": (10, to_int, f"{_PIPELINE} repaints with one fixed mask"),
    "repaint_wav_crossfade_sec": (0.0, to_float, f"{_PIPELINE} returns the whole decoded output (no waveform "
                                                 "splice into the source)"),
    "chunk_mask_mode": ("auto", to_lower, f"{_PIPELINE} builds the repaint mask from the task itself"),
    "extract_codes_only": (False, to_bool, "this engine turns source audio into codes only for full_analysis_only "
                                           "(which the 5 Hz LM then reads)"),
    "guidance_variant": ("apg_classic", to_lower, f"{_PIPELINE} guides with APG (upstream's apg_classic) only"),
    "guidance_params": ({}, to_object, f"{_PIPELINE} applies APG with fixed parameters"),
}
READ_AS.update({name: read for name, (_, read, _) in UPSTREAM_ONLY.items()})


def _upstream_only(name: str) -> Any:
    default, _, why = UPSTREAM_ONLY[name]
    return Field(None, exclude=True, description=f"upstream's; only its default {json.dumps(default)} is accepted: {why}",
                 json_schema_extra={"enum": [default, None]})


def text_list(text: str) -> Any:
    """A list a form sends as text: a JSON string of one ("[...]"), else comma-separated parts (stripped,
    empty ones dropped). Raises ValueError when the JSON does not parse."""
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("not a JSON list") from None
    return [part.strip() for part in text.split(",") if part.strip()]


class StrictRequest(GenerationRequest):
    """Canonical values (handlers/aliases.py) -> a GenerationRequest, in one validation."""

    # /create_random_sample's simple_mode output fed back; request_parsing turns it into lyrics
    instrumental: Optional[bool] = Field(None, exclude=True)
    global_caption: Optional[str] = _upstream_only("global_caption")
    repaint_mode: Optional[str] = _upstream_only("repaint_mode")
    repaint_strength: Optional[float] = _upstream_only("repaint_strength")
    repaint_latent_crossfade_frames: Optional[int] = _upstream_only("repaint_latent_crossfade_frames")
    repaint_wav_crossfade_sec: Optional[float] = _upstream_only("repaint_wav_crossfade_sec")
    chunk_mask_mode: Optional[str] = _upstream_only("chunk_mask_mode")
    extract_codes_only: Optional[bool] = _upstream_only("extract_codes_only")
    guidance_variant: Optional[str] = _upstream_only("guidance_variant")
    guidance_params: Optional[dict[str, Any]] = _upstream_only("guidance_params")

    @field_validator("*", mode="before")
    @classmethod
    def _read(cls, value: Any, info: ValidationInfo) -> Any:
        read = READ_AS.get(info.field_name or "")
        if read is None:  # the audio keys: never sent here (request_parsing takes them out)
            return value
        out = read(value)
        if out is None:
            raise PydanticUseDefault()
        return out

    @field_validator(*UPSTREAM_ONLY)
    @classmethod
    def _only_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        default, _, why = UPSTREAM_ONLY[info.field_name or ""]
        if value is not None and value != default:
            raise ValueError(f"only upstream's default {json.dumps(default)} is accepted here (got {shown(value)}): {why}")
        return None

    @field_validator("lm_backend")
    @classmethod
    def _lm_backend(cls, value: str) -> str:
        # As upstream: the backend is chosen when the LM loads (a worker's ACESTEP_LM_BACKEND); a request's
        # vllm/pt does not reload it. MLX runs on Apple silicon only, which no worker here is.
        if value == "mlx":
            raise ValueError("mlx runs on Apple silicon only; this server's 5 Hz LM runs on vllm or pt, chosen "
                             "when a worker starts (ACESTEP_LM_BACKEND)")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        names = (info.context or {}).get(MODEL_NAMES)
        if value is not None and names and value not in names:
            raise ValueError(f"unknown model {shown(value)}; available: {', '.join(names)}")
        return value
