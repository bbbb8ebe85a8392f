"""The seam for the 5 Hz LM (used by POST /format_input and POST /v1/create_sample).

The API process does not load the LM itself (Lambda must stay light). By default /format_input goes
through a worker (service/format_via_worker.py); `create_app(..., lm_gateway=...)` can pass another
implementation. Without one, /format_input answers 503 until a worker has said it runs the LM
(service/submitter.py: LM_UNAVAILABLE).
"""
from __future__ import annotations

from typing import Any, Protocol


class LMGateway(Protocol):
    def format_sample(self, *, caption: str, lyrics: str, metadata: dict[str, Any], temperature: float) -> dict[str, Any]:
        """Rewrite caption/lyrics/metas. Returns a dict with any of caption, lyrics, bpm,
        key_scale, time_signature, duration, vocal_language (missing keys fall back to the input).
        Raise engine.types.GenerationError with a client-facing message on failure."""

    def create_sample(self, *, query: str, instrumental: bool, vocal_language: str, temperature: float) -> dict[str, Any]:
        """Write a song from a description. Returns a dict with any of caption, lyrics, bpm, key_scale,
        time_signature, duration, vocal_language. Raise engine.types.GenerationError on failure."""
