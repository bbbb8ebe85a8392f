"""Upstream's names for request fields (§1.4, §2.1.2) -> canonical names, each with where it came from.

A /release_task body may name a field several ways and in three places: the top level, `param_obj`,
and the first truthy of metas/meta/metadata/user_metadata/userMetadata. `resolve` picks, per canonical
field, the value upstream would read: the first place that has one, and there the first of the
field's aliases (a None value means "not given": the next one is tried). Nothing is coerced here;
the strict readers and GenerationRequest validate the canonical values (request_parsing.py), and an
error names the field as the client did, from `Canonical.origins`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .fields import StrictRequest

Loc = tuple[str, ...]  # where a value sits in the body: ("bpm",) or ("param_obj", "duration")

BOOL_WORDS = frozenset({"true", "1", "yes", "y", "on", "false", "0", "no", "n", "off"})
EXTRA_SOURCES = ("metas", "meta", "metadata", "user_metadata", "userMetadata")

# canonical field -> upstream names, first match wins (fields not listed answer to their own name)
ALIASES: dict[str, tuple[str, ...]] = {
    "task_type": ("task_type", "taskType"),
    "prompt": ("prompt", "caption"),
    "track_name": ("track_name", "trackName"),
    "complete_track_classes": ("complete_track_classes", "completeTrackClasses", "track_classes", "trackClasses",
                               "instruments"),
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
    "audio_cover_strength": ("audio_cover_strength", "audioCoverStrength", "cover_strength", "coverStrength"),
    "cover_noise_strength": ("cover_noise_strength", "coverNoiseStrength"),
    "repainting_start": ("repainting_start", "repaintingStart"),
    "repainting_end": ("repainting_end", "repaintingEnd"),
    "audio_code_string": ("audio_code_string", "audioCodeString", "audio_codes"),
    "audio_format": ("audio_format", "audioFormat"),
    "thinking": ("thinking", "think"),
    "sample_mode": ("sample_mode", "sampleMode"),
    "sample_query": ("sample_query", "sampleQuery", "description", "desc"),
    "use_format": ("use_format", "useFormat", "format"),  # "format": "wav" is the audio format (resolve)
    "analysis_only": ("analysis_only", "analysisOnly"),
    "full_analysis_only": ("full_analysis_only", "fullAnalysisOnly"),
    "extract_codes_only": ("extract_codes_only", "extractCodesOnly"),
    "constrained_decoding": ("constrained_decoding", "constrainedDecoding", "constrained"),
    "constrained_decoding_debug": ("constrained_decoding_debug", "constrainedDecodingDebug"),
    "use_cot_caption": ("use_cot_caption", "cot_caption", "cot-caption"),
    "use_cot_language": ("use_cot_language", "cot_language", "cot-language"),
    "is_format_caption": ("is_format_caption", "isFormatCaption"),
    "allow_lm_batch": ("allow_lm_batch", "allowLmBatch", "parallel_thinking"),
}

# Audio sources are not request fields: request_parsing takes them out (file > key > path).
SOURCE_ALIASES: dict[str, tuple[str, ...]] = {
    "src_audio_key": ("src_audio_key", "srcAudioKey", "ctx_audio_key"),
    "src_audio_path": ("src_audio_path", "ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"),
    "reference_audio_key": ("reference_audio_key", "referenceAudioKey", "ref_audio_key"),
    "reference_audio_path": ("reference_audio_path", "ref_audio_path", "referenceAudioPath", "refAudioPath"),
}


@dataclass
class Canonical:
    """Request values by canonical name, as sent (not coerced), and where each came from."""
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Loc] = field(default_factory=dict)

    def put(self, name: str, value: Any, origin: Loc) -> None:
        """Set `name`; None means "not given" and leaves it unset."""
        if value is not None:
            self.values[name] = value
            self.origins[name] = origin

    def pop(self, name: str) -> Optional[tuple[Loc, Any]]:
        if name not in self.values:
            return None
        return self.origins.pop(name), self.values.pop(name)


def _alias_table(canonical_names: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    table: dict[str, tuple[str, int]] = {}
    for name in canonical_names:
        for rank, alias in enumerate(ALIASES.get(name) or SOURCE_ALIASES.get(name) or (name,)):
            table.setdefault(alias, (name, rank))
    return table


# every name a body may use -> (canonical field, its rank among that field's aliases)
BY_ALIAS = _alias_table((*StrictRequest.model_fields, *SOURCE_ALIASES))
del BY_ALIAS["src_audio_key"], BY_ALIAS["reference_audio_key"]  # as request fields: only through sources
BY_ALIAS.update(_alias_table(tuple(SOURCE_ALIASES)))


def parse_object(value: Any, name: str) -> Optional[dict[str, Any]]:
    """A nested source given as an object or a JSON string of one; empty means absent."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f"{name}: must be a JSON object or a JSON string of one") from None
        if value is None or value == {}:
            return None
    if isinstance(value, dict):
        return value
    raise ValueError(f"{name}: must be a JSON object or a JSON string of one")


def body_sources(fields: Mapping[str, Any]) -> list[tuple[Loc, Mapping[str, Any]]]:
    """Where upstream reads values, in its order: the top level, param_obj, the first truthy metas-like
    object. Raises ValueError (a client-facing message) for a nested source that is not an object."""
    top = {k: v for k, v in fields.items() if k != "param_obj" and k not in EXTRA_SOURCES}
    sources: list[tuple[Loc, Mapping[str, Any]]] = [((), top)]
    param_obj = parse_object(fields.get("param_obj"), "param_obj")
    if param_obj:
        sources.append((("param_obj",), param_obj))
    for name in EXTRA_SOURCES:
        if fields.get(name):  # the first truthy one, as upstream
            extra = parse_object(fields[name], name)
            if extra:
                sources.append(((name,), extra))
            break
    return sources


def _names_a_format(value: Any) -> bool:
    """`format` is upstream's alias of use_format, but clients also send "format": "mp3"."""
    return isinstance(value, str) and value.strip().lower() not in BOOL_WORDS | {""}


def resolve(fields: Mapping[str, Any]) -> Canonical:
    """Each canonical field's value as upstream reads it from `fields`, and where it came from.

    `format` holding a format name is the audio format when no audio_format is given anywhere."""
    best: dict[str, tuple[tuple[int, int], Loc, Any]] = {}
    sources = body_sources(fields)
    for index, (prefix, source) in enumerate(sources):
        for key, value in source.items():
            target = BY_ALIAS.get(key) if value is not None else None
            if target is None:
                continue
            name, rank = target
            order = (index, rank)
            if key == "format" and _names_a_format(value):
                name, order = "audio_format", (len(sources) + index, 0)  # after every audio_format
            if name not in best or order < best[name][0]:
                best[name] = (order, prefix + (key,), value)
    out = Canonical()
    for name, (_, origin, value) in best.items():
        out.put(name, value, origin)
    return out


__all__ = ["ALIASES", "BY_ALIAS", "Canonical", "EXTRA_SOURCES", "Loc", "SOURCE_ALIASES", "body_sources",
           "parse_object", "resolve"]
