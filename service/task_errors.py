"""What a failed task tells its client: the reason, without the process's internals.

Exception texts from torch, numpy or libsndfile can carry heap addresses, allocator statistics and
server paths; those help an attacker (ASLR, memory layout) and no client. The full text stays in
the worker log.
"""
from __future__ import annotations

import re

from engine.adapter_manifest import AdapterMissing
from engine.types import GenerationError

from .records import FailureReason

MAX_ERROR_CHARS = 2000  # stored in the task record (DynamoDB items are bounded)

_OUT_OF_MEMORY = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|std::bad_alloc|"
                            r"DefaultCPUAllocator: can't allocate", re.I)
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{4,}\b")
_PATH = re.compile(r"(?<![\w:])/(?:[\w.+-]+/)+[\w.+-]*")
OUT_OF_MEMORY_MESSAGE = ("the worker ran out of memory while generating; try a shorter audio_duration, "
                         "a smaller batch_size or fewer inference_steps")


def sanitize_error(message: str) -> str:
    if _OUT_OF_MEMORY.search(message):
        head = message.split(":", 1)[0] if message.startswith("internal error") else ""
        return f"{head}: {OUT_OF_MEMORY_MESSAGE}" if head else OUT_OF_MEMORY_MESSAGE
    text = _ADDRESS.sub("0x…", message)
    text = _PATH.sub("<path>", text)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"


class TaskFailure(GenerationError):
    """A worker-side refusal or failure that knows its FailureReason (a plain GenerationError is REJECTED)."""

    def __init__(self, message: str, reason: FailureReason):
        super().__init__(message)
        self.reason = reason


def describe_failure(exc: BaseException) -> tuple[str, FailureReason]:
    """What a failed task's client is told, and the reason it is recorded under."""
    if isinstance(exc, TaskFailure):
        return sanitize_error(str(exc)), exc.reason
    if isinstance(exc, AdapterMissing):
        return sanitize_error(str(exc)), FailureReason.ADAPTER_MISSING
    if isinstance(exc, GenerationError):
        return sanitize_error(str(exc)), FailureReason.REJECTED
    # An unexpected crash: say what kind, without a traceback (that goes to the worker log).
    return sanitize_error(f"internal error while generating: {type(exc).__name__}: {exc}"), FailureReason.ENGINE_ERROR
