"""JSON log lines that carry their context: a request's id, a task's id and attempt.

Every module logs through `logging.getLogger(__name__)`, so a line's `logger` field names the
module that wrote it (handlers.*, service.*, engine.*). `log_context` binds fields for the code
running inside it (contextvars: per thread and per asyncio task), and the handler installed by
`configure_logging` adds them to every line, including lines from libraries.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from typing import Any, Iterator, Optional, TextIO

from pythonjsonlogger.json import JsonFormatter

_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("acestep_log_fields", default={})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to every log line written inside the block (None values are left out)."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


# Fields libraries attach for their own console formatting: uvicorn's `color_message` is the message
# again with ANSI colour codes, noise in a JSON line.
DROPPED_FIELDS = ("color_message",)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (explicit `extra=` fields win) and drops DROPPED_FIELDS."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in DROPPED_FIELDS:
            record.__dict__.pop(key, None)
        for key, value in _fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Optional[TextIO] = None) -> None:
    """One handler on the root logger: JSON lines (`fmt="json"`) or plain text (`"text"`)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}", style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    root = logging.getLogger()
    root.handlers[:] = [handler]  # also replaces the Lambda runtime's handler, which drops INFO
    root.setLevel(level.upper())
