"""How the console scripts end on a failure a user can fix: one line on stderr naming the setting or model,
the cause and the fix, and a non-zero exit status. The traceback only with `--debug` or ACESTEP_DEBUG=1.

    with user_errors("acestep-models", debug):
        ...

Torch-free: the API imports it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence

EXIT_FAILED = 1
EXIT_CONFIG = 2  # a setting or an argument is wrong

CONFIG_FIX = "fix it in the environment or in .env (.env.example describes every setting)"


class CliError(Exception):
    """A failure the command itself explains in one line (exit status `code`)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """--debug on the command line (looked for before parsing, which may itself fail) or ACESTEP_DEBUG=1."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("ACESTEP_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# Failures a user fixes (a model to download, a layout to complete), by module: looked up in sys.modules, so the
# API, which never imports the engine, does not import it here either (an exception of a class never
# imported cannot be raised).
_ENGINE_ERRORS = (("engine.weights.model_sources", "DownloadFailed"), ("engine.weights.checkpoints", "ModelNotFound"),
                  ("engine.weights.original_layout", "ConversionError"))


def explain(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for the failures a user can fix; None for the others (bugs)."""
    from service.config import ConfigError

    if isinstance(exc, CliError):
        return one_line(exc), exc.code
    if isinstance(exc, ConfigError):
        return f"{one_line(exc)}; {CONFIG_FIX}", EXIT_CONFIG
    for module, name in _ENGINE_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return one_line(exc), EXIT_FAILED
    return None


@contextlib.contextmanager
def user_errors(prog: str, debug: bool | None = None) -> Iterator[None]:
    """Turn the failures `explain` knows into `prog: error: <one line>` and SystemExit; the traceback too
    when debugging. Other exceptions (bugs) go up unchanged, traceback and all."""
    debug = debug_requested() if debug is None else debug
    try:
        yield
    except Exception as exc:
        explained = explain(exc)
        if explained is None:
            raise
        message, code = explained
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(code) from None
