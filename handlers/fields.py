"""The /release_task field table (upstream §1.4, §2.1.2): aliases, sources and strict coercion.

Sources are searched in upstream's order: (1) top-level fields, (2) `param_obj` (object or JSON
string), (3) the first truthy of metas/meta/metadata/user_metadata/userMetadata. Within a source
aliases are tried in order and the first value that is not None wins. Unlike upstream, a value
that cannot be read as its type is a 400 naming the field, never a silent default.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from .envelope import bad_request

BOOL_TRUE = {"true", "1", "yes", "y", "on"}
BOOL_FALSE = {"false", "0", "no", "n", "off"}
EXTRA_SOURCES = ("metas", "meta", "metadata", "user_metadata", "userMetadata")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Spec:
    aliases: tuple[str, ...]
    kind: str  # str | optstr | lower | int | float | bool | seed | floatlist | strlist | codes


def _s(kind: str, *aliases: str) -> Spec:
    return Spec(tuple(aliases), kind)


# canonical GenerationRequest field (or a parser-only key) -> how to find and read it
FIELDS: dict[str, Spec] = {
    "task_type": _s("lower", "task_type", "taskType"),
    "prompt": _s("str", "prompt", "caption"),
    "lyrics": _s("str", "lyrics"),
    "instruction": _s("optstr", "instruction"),
    "track_name": _s("optstr", "track_name", "trackName"),
    "complete_track_classes": _s("strlist", "complete_track_classes", "completeTrackClasses", "track_classes"),
    "model": _s("optstr", "model", "model_name", "modelName", "dit_model", "ditModel"),
    "bpm": _s("int", "bpm"),
    "key_scale": _s("str", "key_scale", "keyscale", "keyScale", "key"),
    "time_signature": _s("str", "time_signature", "timesignature", "timeSignature"),
    "audio_duration": _s("float", "audio_duration", "duration", "audioDuration", "target_duration",
                         "targetDuration"),
    "vocal_language": _s("str", "vocal_language", "vocalLanguage", "language"),
    "inference_steps": _s("int", "inference_steps", "inferenceSteps"),
    "guidance_scale": _s("float", "guidance_scale", "guidanceScale"),
    "shift": _s("float", "shift"),
    "infer_method": _s("lower", "infer_method", "inferMethod"),
    "timesteps": _s("floatlist", "timesteps"),
    "cfg_interval_start": _s("float", "cfg_interval_start"),
    "cfg_interval_end": _s("float", "cfg_interval_end"),
    "use_adg": _s("bool", "use_adg"),
    "use_tiled_decode": _s("bool", "use_tiled_decode", "useTiledDecode"),
    "batch_size": _s("int", "batch_size", "batchSize"),
    "use_random_seed": _s("bool", "use_random_seed", "useRandomSeed"),
    "seeds": _s("seed", "seed", "seeds"),
    "audio_cover_strength": _s("float", "audio_cover_strength", "audioCoverStrength"),
    "repainting_start": _s("float", "repainting_start", "repaintingStart"),
    "repainting_end": _s("float", "repainting_end", "repaintingEnd"),
    "audio_code_string": _s("codes", "audio_code_string", "audioCodeString", "audio_codes"),
    "audio_format": _s("lower", "audio_format", "audioFormat"),
    "thinking": _s("bool", "thinking", "think"),
    "sample_mode": _s("bool", "sample_mode", "sampleMode"),
    "sample_query": _s("str", "sample_query", "sampleQuery", "description", "desc"),
    "use_format": _s("bool", "use_format", "useFormat", "format"),
    "analysis_only": _s("bool", "analysis_only", "analysisOnly"),
    "full_analysis_only": _s("bool", "full_analysis_only", "fullAnalysisOnly"),
    "lm_model_path": _s("optstr", "lm_model_path"),
    "lm_backend": _s("lower", "lm_backend"),
    "lm_temperature": _s("float", "lm_temperature"),
    "lm_cfg_scale": _s("float", "lm_cfg_scale"),
    "lm_top_k": _s("int", "lm_top_k"),
    "lm_top_p": _s("float", "lm_top_p"),
    "lm_repetition_penalty": _s("float", "lm_repetition_penalty"),
    "lm_negative_prompt": _s("str", "lm_negative_prompt"),
    "constrained_decoding": _s("bool", "constrained_decoding", "constrainedDecoding", "constrained"),
    "constrained_decoding_debug": _s("bool", "constrained_decoding_debug", "constrainedDecodingDebug"),
    "use_cot_caption": _s("bool", "use_cot_caption", "cot_caption", "cot-caption"),
    "use_cot_language": _s("bool", "use_cot_language", "cot_language", "cot-language"),
    "is_format_caption": _s("bool", "is_format_caption", "isFormatCaption"),
    "allow_lm_batch": _s("bool", "allow_lm_batch", "allowLmBatch", "parallel_thinking"),
}

# Parser-only keys: audio sources (resolved to blob keys) and sample feedback.
AUDIO_FIELDS: dict[str, Spec] = {
    "src_audio_path": _s("optstr", "src_audio_path", "ctx_audio_path", "sourceAudioPath", "srcAudioPath",
                         "ctxAudioPath"),
    "reference_audio_path": _s("optstr", "reference_audio_path", "ref_audio_path", "referenceAudioPath",
                               "refAudioPath"),
    "src_audio_key": _s("optstr", "src_audio_key", "srcAudioKey", "ctx_audio_key"),
    "reference_audio_key": _s("optstr", "reference_audio_key", "referenceAudioKey", "ref_audio_key"),
    "instrumental": _s("bool", "instrumental"),
}


@dataclass
class Found:
    value: Any
    label: str  # how to name it in an error: "bpm", "param_obj.duration (audio_duration)"


def _label(prefix: str, alias: str, canonical: str) -> str:
    name = f"{prefix}{alias}"
    if canonical == "seeds":
        canonical = "seed"
    return name if alias == canonical else f"{name} ({canonical})"


def parse_object(value: Any, name: str) -> Optional[dict]:
    """An extra source given as an object or a JSON string of one; empty means absent."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, bytes)):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            raise bad_request(f"{name}: must be a JSON object or a JSON string of one") from None
        if parsed is None or parsed == {}:
            return None
        if isinstance(parsed, dict):
            return parsed
    raise bad_request(f"{name}: must be a JSON object or a JSON string of one")


def sources(fields: dict) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = [("", fields)]
    param_obj = parse_object(fields.get("param_obj"), "param_obj")
    if param_obj:
        out.append(("param_obj.", param_obj))
    for name in EXTRA_SOURCES:
        if fields.get(name):  # the first truthy one, as upstream
            extra = parse_object(fields[name], name)
            if extra:
                out.append((f"{name}.", extra))
            break
    return out


def find(srcs: list[tuple[str, dict]], canonical: str, spec: Spec) -> Optional[Found]:
    for prefix, src in srcs:
        for alias in spec.aliases:
            if alias in src and src[alias] is not None:
                return Found(src[alias], _label(prefix, alias, canonical))
    return None


# --- coercion -------------------------------------------------------------------------------

def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def to_int(v: Any, label: str) -> Optional[int]:
    if isinstance(v, bool):
        raise bad_request(f"{label}: must be an integer (got {_show(v)})")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer():
            return int(v)
        raise bad_request(f"{label}: must be an integer (got {_show(v)})")
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
    raise bad_request(f"{label}: must be an integer (got {_show(v)})")


def to_float(v: Any, label: str) -> Optional[float]:
    if isinstance(v, bool):
        raise bad_request(f"{label}: must be a number (got {_show(v)})")
    if isinstance(v, (int, float)):
        try:
            f = float(v)
        except OverflowError:
            raise bad_request(f"{label}: must be a finite number (got a number that is too large)") from None
    elif isinstance(v, str):
        s = v.strip()
        if s == "":
            return None
        try:
            f = float(s)
        except ValueError:
            raise bad_request(f"{label}: must be a number (got {_show(v)})") from None
    else:
        raise bad_request(f"{label}: must be a number (got {_show(v)})")
    if not math.isfinite(f):
        raise bad_request(f"{label}: must be a finite number (got {_show(v)})")
    return f


def to_bool(v: Any, label: str) -> Optional[bool]:
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
    raise bad_request(f"{label}: must be a boolean: true/false, 1/0, yes/no or on/off (got {_show(v)})")


def to_str(v: Any, label: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    raise bad_request(f"{label}: must be a string (got {type(v).__name__})")


def _split(v: str) -> list[str]:
    for sep in ("|", ";"):
        v = v.replace(sep, ",")
    return [p.strip() for p in v.split(",") if p.strip()]


def to_seeds(v: Any, label: str) -> Optional[list[int]]:
    """`seed`: an int, a list of ints, or "1,2,3"; -1 means random (for that item)."""
    hint = f"{label}: must be an integer 0-{MAX_SEED}, -1 for random, or a comma-separated list of them"
    if isinstance(v, (list, tuple)):
        items = list(v)
    elif isinstance(v, str):
        if v.strip() == "":
            return None
        items = _split(v)
    else:
        items = [v]
    if not items or len(items) > 64:
        raise bad_request(f"{hint} (got {_show(v)})")
    seeds: list[int] = []
    for item in items:
        try:
            n = to_int(item, label)
        except Exception:
            raise bad_request(f"{hint} (got {_show(v)})") from None
        if n is None or n < -1 or n > MAX_SEED:
            raise bad_request(f"{hint} (got {_show(v)})")
        seeds.append(n)
    return seeds


def to_float_list(v: Any, label: str) -> Optional[list[float]]:
    if isinstance(v, str):
        s = v.strip().strip("[]")
        if s == "":
            return None
        items: list[Any] = _split(s)
    elif isinstance(v, (list, tuple)):
        items = list(v)
    else:
        raise bad_request(f"{label}: must be a list of numbers or a comma-separated string (got {_show(v)})")
    out = []
    for item in items:
        f = to_float(item, label)
        if f is None:
            raise bad_request(f"{label}: must be a list of numbers or a comma-separated string (got {_show(v)})")
        out.append(f)
    return out or None


def to_str_list(v: Any, label: str) -> Optional[list[str]]:
    if isinstance(v, str):
        return _split(v) or None
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return [x.strip() for x in v if x.strip()] or None
    raise bad_request(f"{label}: must be a list of strings or a comma-separated string (got {_show(v)})")


def to_codes(v: Any, label: str) -> str:
    if isinstance(v, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise bad_request(f"{label}: a list must hold integer codes 0-63999")
        return ",".join(str(x) for x in v)
    return to_str(v, label)


def coerce(kind: str, value: Any, label: str) -> Any:
    """The value as its field type; None means "use the default" (e.g. "" for a number)."""
    if kind == "str":
        return to_str(value, label)
    if kind == "optstr":
        s = to_str(value, label).strip()
        return s or None
    if kind == "lower":
        s = to_str(value, label).strip().lower()
        return s or None
    if kind == "int":
        return to_int(value, label)
    if kind == "float":
        return to_float(value, label)
    if kind == "bool":
        return to_bool(value, label)
    if kind == "seed":
        return to_seeds(value, label)
    if kind == "floatlist":
        return to_float_list(value, label)
    if kind == "strlist":
        return to_str_list(value, label)
    if kind == "codes":
        return to_codes(value, label)
    raise AssertionError(kind)
