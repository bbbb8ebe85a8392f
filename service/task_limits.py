"""What one task may cost, checked at submit on both backends.

Cost is GPU work in "audio-second steps": output seconds x batch items x diffusion steps. The
largest request upstream accepts (600 s x 8 x 200 steps) is 960,000, hours of GPU time; the
default ceiling (ACESTEP_MAX_TASK_COST) admits e.g. 240 s x 4 items x 64 steps. A request must
also fit a task record as stored (DynamoDB items are at most 400 KB, with the result beside it).
"""
from __future__ import annotations

import json

from engine.plan import DEFAULT_TEXT2MUSIC_SECONDS
from engine.request import GenerationRequest

MAX_REQUEST_BYTES = 64 * 1024  # the request as stored in the task record
MAX_SOURCE_SECONDS = 600.0  # a task with source audio may produce up to this much


class TaskRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def task_cost(request: GenerationRequest) -> float:
    steps = len(request.timesteps) if request.timesteps else request.inference_steps
    seconds = request.audio_duration or (MAX_SOURCE_SECONDS if request.task_type != "text2music"
                                          else DEFAULT_TEXT2MUSIC_SECONDS)
    return float(seconds) * request.batch_size * steps


def check_task(request: GenerationRequest, stored: dict, max_cost: float) -> None:
    """TaskRefused (413) when the stored request is too large or the task costs more than `max_cost`."""
    size = len(json.dumps(stored, ensure_ascii=False).encode("utf-8"))
    if size > MAX_REQUEST_BYTES:
        raise TaskRefused(413, f"the request is {size} bytes as stored; the limit is {MAX_REQUEST_BYTES} bytes "
                               "(shorten prompt, lyrics, complete_track_classes or other long fields)")
    cost = task_cost(request)
    if max_cost > 0 and cost > max_cost:
        raise TaskRefused(413, f"this task would cost {cost:,.0f} audio-second steps (audio_duration x batch_size x "
                               f"inference_steps); the limit is {max_cost:,.0f} (ACESTEP_MAX_TASK_COST): use a "
                               "shorter duration, a smaller batch or fewer steps")
