"""Which tasks take the interactive lane: LM-only calls a client waits for with the request open.

/format_input's task (metadata only, no audio: a few seconds of LM) must not wait behind a queue of
generations (minutes each on a small machine). A worker takes an interactive task before any generation
waiting, so it waits at most for the engine call in progress. The embedded queue orders by lane; on
AWS the lane is a second SQS queue (ACESTEP_INTERACTIVE_QUEUE_URL) read before the main one.
"""
from __future__ import annotations

from engine.request import GenerationRequest


def is_interactive(request: GenerationRequest) -> bool:
    """LM-only (analysis_only: no DiT, no audio), and no source audio to read and encode."""
    return bool(request.analysis_only) and not request.full_analysis_only


__all__ = ["is_interactive"]
