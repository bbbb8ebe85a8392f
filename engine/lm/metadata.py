"""Reading the 5 Hz LM's output (torch-free): metadata, audio codes and lyrics.

The metadata block is `key: value` lines inside `<think>...</think>`. Phase 1 of generation stops before
`</think>` (the constraint ends it with EOS instead, as upstream does), so the parser never needs the closing
tag: without it, the block is everything before the first audio code (or the whole text).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from engine.lm.vocab import (BPM_RANGE, DURATION_RANGE, FIELDS, KEYSCALES, LANGUAGES, MAX_AUDIO_CODE,
                             TIME_SIGNATURES)

_CODE_RE = re.compile(r"<\|audio_code_(\d+)\|>")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_LYRIC_HEADER_RE = re.compile(r"^#\s*Lyrics?\s*\n", re.IGNORECASE)
_INT_FIELDS = ("bpm", "duration")


@dataclass
class ParsedOutput:
    metadata: dict[str, Any] = field(default_factory=dict)
    codes: list[int] = field(default_factory=list)
    lyrics: str = ""


def join_caption(text: str) -> str:
    """A YAML-wrapped caption (continuation lines indented) as one line."""
    return " ".join(line.strip() for line in text.split("\n") if line.strip())


def _value(key: str, raw: str) -> Any:
    if key == "caption":
        return join_caption(raw)
    value = raw.strip()
    if key in _INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def metadata_block(text: str) -> str:
    """The text of the metadata block: inside `<think>...</think>`, or, with no closing tag, everything before
    the first audio code."""
    m = _THINK_RE.search(text)
    if m:
        return m.group(1)
    head = text.split("<|audio_code_", 1)[0]
    return head.split("<think>", 1)[1] if "<think>" in head else head


def parse_metadata(text: str) -> dict[str, Any]:
    """`key: value` lines of the metadata block; an indented line continues the previous value (captions wrap).

    Known keys only (FIELDS); bpm and duration become ints when they are integers; a repeated key keeps its first
    value; lines starting with `<` (tags) are skipped.
    """
    metadata: dict[str, Any] = {}
    key: Optional[str] = None
    parts: list[str] = []

    def flush() -> None:
        if key in FIELDS and key not in metadata and "".join(parts).strip():
            metadata[key] = _value(key, "\n".join(parts))

    for line in metadata_block(text).split("\n"):
        if line.strip().startswith("<"):
            continue
        if line and not line[0].isspace() and ":" in line:
            flush()
            name, rest = line.split(":", 1)
            key, parts = name.strip().lower(), [rest]
        elif line[:1] in (" ", "\t") and key is not None:
            parts.append(line)
    flush()
    return metadata


def parse_codes(text: str) -> list[int]:
    """Every `<|audio_code_N|>` in the text with N in range, in order (unused codes past 63999 are dropped)."""
    return [c for c in (int(m) for m in _CODE_RE.findall(text)) if c <= MAX_AUDIO_CODE]


def parse_lyrics(text: str) -> str:
    """Free text after `</think>` (the understand/format/sample modes), minus a `# Lyric` header and `<|im_end|>`."""
    if "</think>" not in text:
        return ""
    after = text.split("</think>", 1)[1].strip()
    after = _LYRIC_HEADER_RE.sub("", after)
    after = re.sub(r"<\|im_end\|>\s*$", "", after)
    return after.strip()


def parse_lm_output(text: str) -> ParsedOutput:
    return ParsedOutput(metadata=parse_metadata(text), codes=parse_codes(text), lyrics=parse_lyrics(text))


def metadata_problems(metadata: Mapping[str, Any]) -> list[str]:
    """What is out of range in parsed metadata (empty = every present value is one the constraint allows)."""
    problems = []
    bpm = metadata.get("bpm")
    if bpm is not None and not (isinstance(bpm, int) and BPM_RANGE[0] <= bpm <= BPM_RANGE[1]):
        problems.append(f"bpm {bpm!r} not an integer in {BPM_RANGE[0]}-{BPM_RANGE[1]}")
    duration = metadata.get("duration")
    if duration is not None and not (isinstance(duration, int) and DURATION_RANGE[0] <= duration <= DURATION_RANGE[1]):
        problems.append(f"duration {duration!r} not an integer in {DURATION_RANGE[0]}-{DURATION_RANGE[1]}")
    key = metadata.get("keyscale")
    if key is not None and key not in KEYSCALES:
        problems.append(f"keyscale {key!r} not one of the {len(KEYSCALES)} key/scales")
    ts = metadata.get("timesignature")
    if ts is not None and str(ts) not in TIME_SIGNATURES:
        problems.append(f"timesignature {ts!r} not one of {', '.join(TIME_SIGNATURES)}")
    lang = metadata.get("language")
    if lang is not None and lang not in LANGUAGES:
        problems.append(f"language {lang!r} not one of the {len(LANGUAGES)} codes")
    return problems
