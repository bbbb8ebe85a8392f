"""/format_input without an LM in the API process: the request becomes a task that a worker with the
LM runs (format mode, metadata only, no audio), and the API waits for its result up to a limit.

The task goes through the same queue, store and workers as any other, so it is retried, fenced and
visible in /v1/stats like them; a caller that gives up leaves it to finish on its own.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from engine.request import GenerationRequest
from engine.types import GenerationError

from .ports import Backend
from .records import FAILED, MODELS_META_KEY, SUCCEEDED, ModelsMeta
from .result_parts import with_whole_result
from .submission import submit_task

POLL_SECONDS = 0.2


class FormatTimeout(Exception):
    """The worker did not answer within the limit (the task itself goes on)."""


def workers_run_lm(backend: Backend) -> Optional[bool]:
    """What the workers last said about their LM; None before any has reported."""
    meta = ModelsMeta.parse(backend.store.get_meta(MODELS_META_KEY))
    return None if meta is None else meta.lm_model not in (None, "", "none")


def lm_served(backend: Backend) -> bool:
    """False only when the workers have said they run no LM; before any has reported, accept (they may be
    scaled to zero) and let the worker decide."""
    return workers_run_lm(backend) is not False


def lm_reported(backend: Backend) -> bool:
    """A worker has said it runs an LM: what a caller that waits for the answer needs (a synchronous
    /format_input cannot wait for a worker to be started)."""
    return workers_run_lm(backend) is True


class WorkerLMGateway:
    def __init__(self, backend: Backend, max_queue: int, timeout: float):
        self.backend, self.max_queue, self.timeout = backend, max_queue, timeout

    def format_sample(self, *, caption: str, lyrics: str, metadata: dict, temperature: float) -> dict:
        request = GenerationRequest.model_validate(dict(
            prompt=caption, lyrics=lyrics, use_format=True, analysis_only=True, batch_size=1,
            lm_temperature=temperature, bpm=metadata.get("bpm"), key_scale=metadata.get("key_scale") or "",
            time_signature=str(metadata.get("time_signature") or ""), audio_duration=metadata.get("duration"),
            vocal_language=metadata.get("language") or "en"))
        task_id, _ = submit_task(self.backend, request.model_dump(), self.max_queue)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            record = self.backend.store.get(task_id)
            if record is not None and record.status == FAILED:
                raise GenerationError(record.error or "the worker could not format the input")
            if record is not None and record.status == SUCCEEDED and record.result is not None:
                whole, _ = with_whole_result(record, self.backend.blobs)
                assert whole.result is not None
                return _answer(whole.result.metas, whole.result.generation_info)
            time.sleep(POLL_SECONDS)
        raise FormatTimeout(f"no worker answered within {self.timeout:g} s (ACESTEP_FORMAT_TIMEOUT); "
                            f"task {task_id} will still finish")


def _known(value: Any) -> Optional[Any]:
    return None if value in (None, "", "N/A") else value


def _answer(metas: dict, info: dict) -> dict:
    lm = info.get("lm_metadata") or {}
    out = {"caption": info.get("caption"), "lyrics": info.get("lyrics"), "bpm": _known(metas.get("bpm")),
           "key_scale": _known(metas.get("keyscale")), "time_signature": _known(metas.get("timesignature")),
           "duration": _known(metas.get("duration")), "vocal_language": _known(lm.get("language"))}
    return {k: v for k, v in out.items() if v is not None}
