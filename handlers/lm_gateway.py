"""The seam for the 5 Hz LM (used by POST /format_input).

The API process does not load the LM itself (Lambda must stay light). A later issue provides an
implementation (e.g. a round trip through the worker) and registers it with `register()`; until
then `get_gateway()` returns None and /format_input answers 503 with an explanation.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

from service.config import Settings
from service.ports import Backend


class LMGateway(Protocol):
    def format_sample(self, *, caption: str, lyrics: str, metadata: dict, temperature: float) -> dict:
        """Rewrite caption/lyrics/metas. Returns a dict with any of caption, lyrics, bpm,
        key_scale, time_signature, duration, vocal_language (missing keys fall back to the input).
        Raise engine.types.GenerationError with a client-facing message on failure."""


GatewayFactory = Callable[[Settings, Backend], Optional[LMGateway]]
_factory: Optional[GatewayFactory] = None


def register(factory: Optional[GatewayFactory]) -> None:
    """Install (or with None, remove) the function that finds an LM for an app."""
    global _factory
    _factory = factory


def get_gateway(settings: Settings, backend: Backend) -> Optional[LMGateway]:
    return _factory(settings, backend) if _factory is not None else None


LM_UNAVAILABLE = ("The 5Hz LM is not loaded on this server, so /format_input is unavailable. "
                  "Run a worker with the LM enabled (ACESTEP_INIT_LLM=true and an LM model), or send "
                  "the caption and lyrics to /release_task as they are.")
