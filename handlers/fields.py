"""GenerationRequest as a client sends it: upstream's aliases and sources (§1.4, §2.1.2), read strictly.

`ReleaseTaskInput` validates a /release_task body in one pydantic pass. Each field also answers to
upstream's aliases (`AliasChoices`), looked up in upstream's order: (1) top-level fields, (2)
`param_obj`, (3) the first truthy of metas/meta/metadata/user_metadata/userMetadata; within a
source the aliases in order. `request_parsing.read_sources` prepares the body for that (None
values dropped, so None means "not given"). Unlike upstream, a value that cannot be read as its
type is an error naming the field, never a silent default; "" (or an empty list) means the default.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from pydantic import AliasChoices, AliasGenerator, AliasPath, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticUseDefault

from engine.request import GenerationRequest

BOOL_TRUE = {"true", "1", "yes", "y", "on"}
BOOL_FALSE = {"false", "0", "no", "n", "off"}
EXTRA_SOURCES = ("metas", "meta", "metadata", "user_metadata", "userMetadata")
NESTED_SOURCES = ("param_obj",) + EXTRA_SOURCES
MAX_SEED = 2**32 - 1
MODEL_NAMES = "model_names"  # validation context: the models this server has (empty: any name)

# canonical field -> upstream names, first match wins (fields not listed answer to their own name)
ALIASES: dict[str, tuple[str, ...]] = {
    "task_type": ("task_type", "taskType"),
    "prompt": ("prompt", "caption"),
    "track_name": ("track_name", "trackName"),
    "complete_track_classes": ("complete_track_classes", "completeTrackClasses", "track_classes"),
    "model": ("model", "model_name", "modelName", "dit_model", "ditModel"),
    "key_scale": ("key_scale", "keyscale", "keyScale", "key"),
    "time_signature": ("time_signature", "timesignature", "timeSignature"),
    "audio_duration": ("audio_duration", "duration", "audioDuration", "target_duration", "targetDuration"),
    "vocal_language": ("vocal_language", "vocalLanguage", "language"),
    "inference_steps": ("inference_steps", "inferenceSteps"),
    "guidance_scale": ("guidance_scale", "guidanceScale"),
    "infer_method": ("infer_method", "inferMethod"),
    "use_tiled_decode": ("use_tiled_decode", "useTiledDecode"),
    "batch_size": ("batch_size", "batchSize"),
    "use_random_seed": ("use_random_seed", "useRandomSeed"),
    "seeds": ("seed", "seeds"),
    "audio_cover_strength": ("audio_cover_strength", "audioCoverStrength"),
    "repainting_start": ("repainting_start", "repaintingStart"),
    "repainting_end": ("repainting_end", "repaintingEnd"),
    "audio_code_string": ("audio_code_string", "audioCodeString", "audio_codes"),
    "audio_format": ("audio_format", "audioFormat"),
    "thinking": ("thinking", "think"),
    "sample_mode": ("sample_mode", "sampleMode"),
    "sample_query": ("sample_query", "sampleQuery", "description", "desc"),
    "use_format": ("use_format", "useFormat", "format"),  # "format": "wav" is the audio format (read_sources)
    "analysis_only": ("analysis_only", "analysisOnly"),
    "full_analysis_only": ("full_analysis_only", "fullAnalysisOnly"),
    "constrained_decoding": ("constrained_decoding", "constrainedDecoding", "constrained"),
    "constrained_decoding_debug": ("constrained_decoding_debug", "constrainedDecodingDebug"),
    "use_cot_caption": ("use_cot_caption", "cot_caption", "cot-caption"),
    "use_cot_language": ("use_cot_language", "cot_language", "cot-language"),
    "is_format_caption": ("is_format_caption", "isFormatCaption"),
    "allow_lm_batch": ("allow_lm_batch", "allowLmBatch", "parallel_thinking"),
}

# Audio sources are not request fields: read_sources takes them out of the body (file > key > path).
SOURCE_ALIASES: dict[str, tuple[str, ...]] = {
    "src_audio_key": ("src_audio_key", "srcAudioKey", "ctx_audio_key"),
    "src_audio_path": ("src_audio_path", "ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"),
    "reference_audio_key": ("reference_audio_key", "referenceAudioKey", "ref_audio_key"),
    "reference_audio_path": ("reference_audio_path", "ref_audio_path", "referenceAudioPath", "refAudioPath"),
}


def upstream_locs(name: str) -> tuple[tuple[str, ...], ...]:
    """Where `name` is looked for, in order: each alias at the top level, then in param_obj, then
    in each metas-like source (read_sources keeps only the first truthy one)."""
    aliases = ALIASES.get(name) or SOURCE_ALIASES.get(name) or (name,)
    return tuple((a,) for a in aliases) + tuple((src, a) for src in NESTED_SOURCES for a in aliases)


LOCS = {name: upstream_locs(name) for name in (*GenerationRequest.model_fields, "instrumental", *SOURCE_ALIASES)}


def choices_of(name: str) -> AliasChoices:
    return AliasChoices(*(loc[0] if len(loc) == 1 else AliasPath(*loc) for loc in upstream_locs(name)))


# --- reading values: each returns None for "use the default" and raises ValueError for a bad value --

def _show(v: Any) -> str:
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
    raise ValueError(f"must be an integer (got {_show(v)})")


def to_float(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        raise ValueError(f"must be a number (got {_show(v)})")
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
            raise ValueError(f"must be a number (got {_show(v)})") from None
    else:
        raise ValueError(f"must be a number (got {_show(v)})")
    if not math.isfinite(f):
        raise ValueError(f"must be a finite number (got {_show(v)})")
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
    raise ValueError(f"must be a boolean: true/false, 1/0, yes/no or on/off (got {_show(v)})")


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
    hint = f"must be an integer 0-{MAX_SEED}, -1 for random, or a comma-separated list of them (got {_show(v)})"
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
    hint = f"must be a list of numbers or a comma-separated string (got {_show(v)})"
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
    raise ValueError(f"must be a list of strings or a comma-separated string (got {_show(v)})")


def to_codes(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("a list must hold integer codes 0-63999")
        return ",".join(str(x) for x in v)
    return to_str(v)


_READERS: dict[Callable[[Any], Any], tuple[str, ...]] = {
    to_str: ("prompt", "lyrics", "key_scale", "time_signature", "vocal_language", "sample_query",
             "lm_negative_prompt"),
    to_optstr: ("instruction", "track_name", "model", "lm_model_path"),
    to_lower: ("task_type", "infer_method", "audio_format", "lm_backend"),
    to_int: ("inference_steps", "batch_size", "lm_top_k"),
    to_bpm: ("bpm",),
    to_duration: ("audio_duration",),
    to_float: ("guidance_scale", "shift", "cfg_interval_start", "cfg_interval_end",
               "audio_cover_strength", "repainting_start", "repainting_end", "lm_temperature", "lm_cfg_scale",
               "lm_top_p", "lm_repetition_penalty"),
    to_bool: ("use_adg", "use_tiled_decode", "use_random_seed", "thinking", "sample_mode", "use_format",
              "analysis_only", "full_analysis_only", "constrained_decoding", "constrained_decoding_debug",
              "use_cot_caption", "use_cot_language", "is_format_caption", "allow_lm_batch", "instrumental"),
    to_seeds: ("seeds",),
    to_float_list: ("timesteps",),
    to_str_list: ("complete_track_classes",),
    to_codes: ("audio_code_string",),
}
READ_AS: dict[str, Callable[[Any], Any]] = {name: read for read, names in _READERS.items() for name in names}


class ReleaseTaskInput(GenerationRequest):
    """A /release_task body (as read_sources prepares it) -> a GenerationRequest, in one validation."""

    model_config = ConfigDict(extra="ignore", alias_generator=AliasGenerator(validation_alias=choices_of))

    # /create_random_sample's simple_mode output fed back; read_sources turns it into lyrics
    instrumental: Optional[bool] = Field(None, exclude=True)

    @field_validator("*", mode="before")
    @classmethod
    def _read(cls, value: Any, info: ValidationInfo) -> Any:
        read = READ_AS.get(info.field_name or "")
        if read is None:  # the audio keys: never sent here (read_sources takes them out)
            return value
        out = read(value)
        if out is None:
            raise PydanticUseDefault()
        return out

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        names = (info.context or {}).get(MODEL_NAMES)
        if value is not None and names and value not in names:
            raise ValueError(f"unknown model {value!r}; available: {', '.join(names)}")
        return value
