"""What the benchmarks measure with, in one place: wall and CPU time, resident and peak memory (Linux
/proc), waiting for memory before a big row, and running one row in a fresh interpreter.

Standard library only: a benchmark's parent process imports it before (or without) torch.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

GIB = 1024**3


# ---------------------------------------------------------------- time

def best(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` wall times of fn() (interference on a shared machine only adds time)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class Span:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU, all threads


@contextmanager
def timed() -> Iterator[Span]:
    """Wall and CPU seconds of the block; read the span after it."""
    span = Span()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield span
    finally:
        span.wall_s, span.cpu_s = time.perf_counter() - t0, time.process_time() - c0


def cpu_with_children() -> float:
    """CPU seconds of this process and its reaped children (inductor compiles in worker subprocesses)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def loadavg() -> str:
    """The 1/5/15-minute load, for a run's header (a loaded machine explains slow rows)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------- memory (Linux /proc)

def status_bytes(key: str) -> int:
    """A byte figure of /proc/self/status: VmRSS (resident now), VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_bytes() -> int:
    return status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset_peak() (since the start without one)."""
    try:
        return status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; never reset


def reset_peak() -> None:
    """VmHWM starts again from the current RSS: building a model peaks higher than the step measured next."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(needed: int, poll_s: float = 10.0, limit_s: float = 300.0) -> tuple[bool, int]:
    """Wait (polling) until MemAvailable reaches `needed` bytes, at most limit_s: (reached, MemAvailable).
    The machine is shared: a row that would not fit now may fit once another benchmark ends."""
    deadline = time.monotonic() + limit_s
    while True:
        free = mem_available()
        if free >= needed or time.monotonic() >= deadline:
            return free >= needed, free
        print(f"  waiting: MemAvailable {free / GIB:.1f} GiB < {needed / GIB:.1f} GiB", file=sys.stderr, flush=True)
        time.sleep(poll_s)


# ---------------------------------------------------------------- one row, one interpreter

# A bare environment for an in-process API child: no settings, credentials or hub access leak in from the shell.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


class ChildFailed(RuntimeError):
    def __init__(self, returncode: int, stderr_tail: str):
        super().__init__(f"child exited {returncode} (negative: killed by a signal)"
                         + (f":\n{stderr_tail}" if stderr_tail else ""))
        self.returncode = returncode


def run_child(args: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
              timeout: Optional[float] = None, show_stderr: bool = False) -> dict[str, Any]:
    """Run `python *args` in a fresh interpreter and return the JSON object on the last line of its stdout
    that holds one. A row per process: its imports, allocator and peak RSS are its own. Raises ChildFailed
    (with the tail of its stderr, unless that went to ours) when it fails or prints no object."""
    proc = subprocess.run([sys.executable, *args], env=None if env is None else dict(env), cwd=cwd, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE, text=True)
    objects = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not objects:
        raise ChildFailed(proc.returncode, (proc.stderr or "")[-3000:])
    result: dict[str, Any] = json.loads(objects[-1])
    return result


def write_results(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                  markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str]) -> None:
    """A benchmark's results beside each other: `out`.json (meta and raw rows), `out`.md (its table), printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, meta)
    out.with_suffix(".md").write_text(text)
    print(text)
