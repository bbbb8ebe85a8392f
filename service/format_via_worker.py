"""/format_input without an LM in the API process: the request becomes a task that a worker with the
LM runs (format mode, metadata only, no audio), and the API waits for its result up to a limit.

The task is submitted like any other (the same submit path, so it counts against the caller's limits,
the queue bound and the cost ceiling) and goes through the same queue, store and workers, so it is
retried, fenced and visible in /v1/stats like them. A caller that gives up (the limit passed, or it
hung up) cancels it: an answer nobody waits for is not computed later.

Everything here is one short blocking call; the waiting between reads belongs to the caller
(handlers/routes_lm.py waits on the event loop, not in a thread).
"""
from __future__ import annotations

from typing import Any, Optional

from engine.request import GenerationRequest
from engine.types import GenerationError, GenerationInfo, Metas

from .cancellation import cancel_task
from .ports import Backend
from .records import CANCELLED, FAILED, SUCCEEDED


def format_request(*, caption: str, lyrics: str, metadata: dict[str, Any], temperature: float) -> GenerationRequest:
    """The task that rewrites caption and lyrics: format mode, metadata only, one item, no audio."""
    return GenerationRequest.model_validate(dict(
        prompt=caption, lyrics=lyrics, use_format=True, analysis_only=True, batch_size=1,
        lm_temperature=temperature, bpm=metadata.get("bpm"), key_scale=metadata.get("key_scale") or "",
        time_signature=str(metadata.get("time_signature") or ""), audio_duration=metadata.get("duration"),
        vocal_language=metadata.get("language") or "en"))


def sample_request(*, query: str, instrumental: bool, vocal_language: str, temperature: float) -> GenerationRequest:
    """The task that writes a song from a description (/v1/create_sample): sample mode, metadata only, one
    item, no audio. The planner reads "instrumental" from the description itself (as /release_task's sample
    mode does), so the flag is said in the description when the description does not say it."""
    if instrumental and "instrumental" not in query.lower():
        query = f"{query} (instrumental)" if query.strip() else "instrumental"
    return GenerationRequest.model_validate(dict(
        sample_mode=True, sample_query=query, analysis_only=True, batch_size=1, lm_temperature=temperature,
        vocal_language=vocal_language))


def read_answer(backend: Backend, task_id: str) -> Optional[dict[str, Any]]:
    """The format task's answer (one store read); None while it waits or runs. GenerationError when it
    failed or was cancelled."""
    record = backend.store.get(task_id)
    if record is None:
        raise GenerationError(f"format task {task_id} is gone")
    if record.status in (FAILED, CANCELLED):
        raise GenerationError(record.error or "the worker could not format the input")
    if record.status != SUCCEEDED or record.result is None:
        return None
    return _answer(record.result.metas, record.result.generation_info)


def give_up(backend: Backend, task_id: str, reason: str) -> bool:
    """Cancel a format task nobody waits for any more (queued: it never runs; running: it stops at its
    next progress write). False when it had finished already."""
    return cancel_task(backend, task_id, reason).cancelled_now


def _known(value: Any) -> Optional[Any]:
    return None if value in (None, "") else value


def _answer(metas: Metas, info: GenerationInfo) -> dict[str, Any]:
    language = (info.get("lm_metadata") or {}).get("language")
    out = {"caption": info.get("caption"), "lyrics": info.get("lyrics"), "bpm": metas.bpm,
           "key_scale": _known(metas.key_scale), "time_signature": _known(metas.time_signature),
           "duration": metas.duration, "vocal_language": _known(language)}
    return {k: v for k, v in out.items() if v is not None}
