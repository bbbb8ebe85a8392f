"""The CLI's progress on stderr: queue position while queued, then stage and percent.

A tqdm bar on a terminal; otherwise (a log, a CI job) one plain line per change of stage or of 10%."""
from __future__ import annotations

import shutil
import sys
from typing import Any, Literal, Optional

from .types import TaskState, TaskStatus


def describe(status: TaskStatus) -> str:
    """One short line: "queued #3", "queued", or the stage the server reports."""
    if status.state is TaskState.QUEUED:
        return f"queued #{status.queue_position}" if status.queue_position else "queued"
    return status.stage or status.state.value


class ProgressView:
    def __init__(self, mode: Literal["bar", "lines", "off"]):
        self.mode = mode
        self._bar: Optional[Any] = None
        self._last_line: Optional[tuple[str, int]] = None

    def update(self, status: TaskStatus) -> None:
        if self.mode == "lines":
            line = (describe(status), int(10 * status.progress) * 10)
            if line != self._last_line:
                self._last_line = line
                print(f"{line[0]} {line[1]}%", file=sys.stderr, flush=True)
            return
        if self.mode != "bar":
            return
        if self._bar is None:
            from tqdm import tqdm  # only when drawing: `acestep status` and scripts never pay for it

            # shutil falls back to 80x24 where a pty reports no size; tqdm's own guess draws nothing there
            size = shutil.get_terminal_size()
            self._bar = tqdm(total=100, unit="%", bar_format="{desc:<32.32} {percentage:3.0f}%|{bar}| {elapsed}",
                             leave=True, ncols=size.columns, nrows=size.lines)
        self._bar.set_description_str(describe(status), refresh=False)
        self._bar.n = round(100 * status.progress)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
