"""Runs documented Python commands in one fresh interpreter, for tests/test_doc_commands.py.

Reads a JSON list of {"argv": [...], "env": {...}, "mode": "parse" | "run"} on stdin; writes one JSON list of
{"ok", "detail", "output"} to the file named by its argument (the programs' own prints stay out of it). argv is
the whole command: [".venv/bin/python", "bench/x.py", ...], ["python", "-m", "module", ...] or
[console script, ...].

parse: the program starts as it would (its module runs as __main__, or its console script's function is
called) until its own argparse parser has parsed the whole command line; then it is stopped, before it does
any work. A parser error (an unknown flag, a bad value) fails, as does a program that never parses.
run: the program runs to its end.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised once the program's outermost parse_args / parse_known_args has returned."""


@contextlib.contextmanager
def stop_after_parsing():
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}
    depth = [0]

    def wrap(original):
        def parse(self, *args, **kwargs):
            depth[0] += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:  # subparsers and parse_args call parse_known_args inside: only the outermost stops
                raise Parsed()
            return result
        return parse

    for name, original in originals.items():
        setattr(argparse.ArgumentParser, name, wrap(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(argparse.ArgumentParser, name, original)


def console_scripts() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}


def start(argv: list[str]) -> None:
    """Starts the program argv names as its shell command would."""
    program = os.path.basename(argv[0])
    if program in ("python", "python3"):
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            sys.path.insert(0, str((ROOT / argv[1]).parent))  # as `python script.py` puts its folder first
            runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
        return
    entry = console_scripts().get(program)
    if entry is None:
        raise LookupError(f"{argv[0]}: not a console script of this environment")
    sys.argv = [program, *argv[1:]]
    result = entry.load()()
    if result not in (None, 0):
        raise SystemExit(result)


def one(command: dict) -> dict:
    argv, mode = command["argv"], command["mode"]
    saved_env, saved_path = dict(os.environ), list(sys.path)
    os.environ.update(command.get("env", {}))
    out, err = io.StringIO(), io.StringIO()
    ok, detail = False, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if mode == "parse":
                with stop_after_parsing():
                    start(argv)
                detail = "returned without parsing its arguments"
            else:
                start(argv)
                ok, detail = True, "ran"
    except Parsed:
        ok, detail = True, "parsed"
    except SystemExit as exc:
        ok = exc.code in (None, 0)
        detail = f"exit {exc.code}"
    except Exception as exc:  # reported to the test, which fails naming the command
        detail = f"{type(exc).__name__}: {exc}"
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
    return {"ok": ok, "detail": detail, "output": out.getvalue() + err.getvalue()}


if __name__ == "__main__":
    results_path = Path(sys.argv[1])  # before a program replaces sys.argv
    sys.path.insert(0, str(ROOT))
    results = [one(command) for command in json.loads(sys.stdin.read())]
    results_path.write_text(json.dumps(results))
