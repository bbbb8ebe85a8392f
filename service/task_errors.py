"""What a failed task tells its client: the reason, without the process's internals.

Exception texts from torch, numpy or libsndfile can carry heap addresses, allocator statistics and
server paths; those help an attacker (ASLR, memory layout) and no client. The full text stays in
the worker log.
"""
from __future__ import annotations

import re

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
