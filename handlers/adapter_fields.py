"""A request's adapters as clients name them: `adapter` (a name, a comma-separated list, or a list) and
`adapter_scale` (one number for all, or one per adapter) -- acestep.cpp's fields, in upstream's alias style
(also `lora_name`/`lora_scale`), at the top level, in `param_obj` or in `metas` -- into the canonical
`adapters` list of {name, scale} that GenerationRequest validates.

`adapter: ""`, `[]` or `"none"` is a choice too: no adapter, even when the server has a default
(/v1/lora/load). A body with no adapter field gets the default (service/adapter_resolution.py).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Optional

from engine.request import ADAPTER_NAME_RE, ADAPTER_SCALE_MAX, ADAPTER_SCALE_MIN, MAX_ADAPTERS

from .fields import text_list


# upstream's nested sources, read in this order after the top level (as handlers/aliases.py reads them)
EXTRA_SOURCES = ("metas", "meta", "metadata", "user_metadata", "userMetadata")
NAMES = ("adapter", "adapters", "adapter_name", "adapterName", "lora_name", "loraName", "lora")
SCALES = ("adapter_scale", "adapterScale", "adapter_scales", "adapterScales", "lora_scale", "loraScale")
NONE_WORDS = ("", "none", "null")


def parse_object(value: Any, name: str) -> Optional[Mapping[str, Any]]:
    """A nested source: an object, or a JSON string of one (what a form sends)."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f"{name}: must be a JSON object or a JSON string of one") from None
    return value if isinstance(value, dict) else None


def _find(fields: Mapping[str, Any], names: tuple[str, ...]) -> Optional[tuple[str, Any]]:
    """The first of `names` in upstream's order: the top level, param_obj, the first truthy metas-like object."""
    sources: list[tuple[str, Mapping[str, Any]]] = [("", fields)]
    try:
        param_obj = parse_object(fields.get("param_obj"), "param_obj")
    except ValueError:
        param_obj = None  # the request's own parse names it
    if param_obj:
        sources.append(("param_obj.", param_obj))
    for extra in EXTRA_SOURCES:
        if fields.get(extra):
            try:
                nested = parse_object(fields[extra], extra)
            except ValueError:
                nested = None
            if nested:
                sources.append((f"{extra}.", nested))
            break
    for prefix, source in sources:
        for name in names:
            if source.get(name) is not None:
                return prefix + name, source[name]
    return None


def _scale(value: Any, label: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{label}: an adapter scale must be a number (got {value!r})")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: an adapter scale must be a number or a list of numbers "
                         f"(got {str(value)[:40]!r})") from None
    if not math.isfinite(number) or not ADAPTER_SCALE_MIN <= number <= ADAPTER_SCALE_MAX:
        raise ValueError(f"{label}: must be between {ADAPTER_SCALE_MIN:g} and {ADAPTER_SCALE_MAX:g} "
                         f"(an adapter scale; got {str(value)[:40]!r})")
    return number


def _items(value: Any, label: str) -> list[Any]:
    if isinstance(value, str):
        if value.strip().lower() in NONE_WORDS:
            return []
        try:
            value = text_list(value)
        except ValueError:
            raise ValueError(f"{label}: must be an adapter name or a list of them") from None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{label}: must be an adapter name or a list of them (got {type(value).__name__})")


def read_adapters(fields: Mapping[str, Any]) -> Optional[list[dict[str, Any]]]:
    """The adapters the body names as [{name, scale}], or None when it names none (the default applies).
    Raises ValueError naming the field as the client sent it."""
    named, scaled = _find(fields, NAMES), _find(fields, SCALES)
    if named is None:
        if scaled is not None:
            raise ValueError(f"{scaled[0]}: needs `adapter` (the adapters it scales)")
        return None
    label, value = named
    items = _items(value, label)
    if len(items) > MAX_ADAPTERS:
        raise ValueError(f"{label}: at most {MAX_ADAPTERS} adapters (got {len(items)})")
    scales: list[Optional[float]] = [None] * len(items)
    if scaled is not None:
        scale_label, scale_value = scaled
        if isinstance(scale_value, str) and (scale_value.strip().startswith("[") or "," in scale_value):
            try:
                scale_value = text_list(scale_value)
            except ValueError:
                raise ValueError(f"{scale_label}: an adapter scale must be a number or a list of numbers") from None
        if isinstance(scale_value, (list, tuple)):
            if len(scale_value) != len(items):
                raise ValueError(f"{scale_label}: one scale per adapter ({len(items)}), or one number for all "
                                 f"(got {len(scale_value)})")
            scales = [_scale(v, scale_label) for v in scale_value]
        else:
            scales = [_scale(scale_value, scale_label)] * len(items)
    out: list[dict[str, Any]] = []
    for index, (item, scale) in enumerate(zip(items, scales)):
        if isinstance(item, dict):  # {"name": ..., "scale": ...}
            name, own = item.get("name"), item.get("scale")
            scale = scale if scale is not None else (_scale(own, f"{label}[{index}].scale") if own is not None else None)
        else:
            name = item
        if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME_RE, name.strip()):
            raise ValueError(f"{label}: {str(name)[:60]!r} is not an adapter name (letters, digits, '.', '_', '-')")
        out.append({"name": name.strip(), "scale": 1.0 if scale is None else scale})
    names = [a["name"] for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{label}: each adapter may be named once")
    return out


def with_adapters(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The body with its adapter fields replaced by the canonical `adapters` at the top level."""
    adapters = read_adapters(fields)
    if adapters is None:
        return dict(fields)
    out = {k: v for k, v in fields.items() if k not in NAMES and k not in SCALES}
    out["adapters"] = adapters
    return out


_NUMBER_RE = r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*"
# The text forms of a scale read_adapters accepts: "0.8", "0.5, 1", "[0.5, 1]" (the range is checked after).
SCALE_TEXT_RE = rf"^\s*(\[{_NUMBER_RE}(,{_NUMBER_RE})*\]|{_NUMBER_RE}(,{_NUMBER_RE})*)\s*$"


def field_schemas() -> dict[str, dict[str, Any]]:
    """/release_task's OpenAPI schemas of the adapter fields under every name read_adapters reads (`adapters`
    excepted: the canonical list, documented from the request model)."""
    name = {"type": "string", "pattern": ADAPTER_NAME_RE}
    scale = {"type": "number", "minimum": ADAPTER_SCALE_MIN, "maximum": ADAPTER_SCALE_MAX}
    adapter = {"anyOf": [
        {"type": "string", "maxLength": 1024,
         "description": "a name, names separated by commas (or a JSON list), or \"\"/\"none\" for no adapter"},
        {"type": "array", "maxItems": MAX_ADAPTERS, "items": {"anyOf": [name, {
            "type": "object", "required": ["name"], "properties": {"name": name, "scale": scale}}]}},
        {"type": "null"}],
        "description": "LoRA/LoKr adapters for this request (GET /v1/adapters lists them; at most "
                       f"{MAX_ADAPTERS}, stacked). Absent: the server's default (/v1/lora/status); "
                       "a name the server lacks, or one its model does not fit, is a 400"}
    adapter_scale = {"anyOf": [
        scale, {"type": "array", "maxItems": MAX_ADAPTERS, "items": scale},
        {"type": "string", "maxLength": 256, "pattern": SCALE_TEXT_RE,
         "description": "a number, or numbers separated by commas (or a JSON list)"},
        {"type": "null"}],
        "description": f"one scale for every adapter, or one per adapter ({ADAPTER_SCALE_MIN:g} to "
                       f"{ADAPTER_SCALE_MAX:g}; 0 is bit-identical to no adapter); needs `adapter`"}
    return {**{n: adapter for n in NAMES if n != "adapters"}, **{n: adapter_scale for n in SCALES}}


__all__ = ["NAMES", "SCALES", "field_schemas", "read_adapters", "with_adapters"]
