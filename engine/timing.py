"""Per-stage timing of pipeline components, measured with forward hooks, without stalling the device.

Hooks are installed once per module (shared modules are hooked once) and record only while a
`StageClock` is active. On CPU a stage is timed with the wall clock. On CUDA each stage call records a
pair of CUDA events instead of synchronising the device around it: the GPU stamps them as it gets
there, and their times are read once the pipeline's output has been copied to the CPU (which waits
for the GPU anyway), so timing adds no synchronisation. ACESTEP_STAGE_TIMINGS=false installs no hooks
at all: generation_info then times only the whole pipeline call.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Iterator, Optional

import torch

# component attribute on the pipeline -> (submodule path, stage name)
STAGES = {
    "text_encoder": ("", "text_encoding"),
    "condition_encoder": ("", "condition_encoding"),
    "audio_tokenizer": ("", "audio_codes"),
    "audio_token_detokenizer": ("", "audio_codes"),
    "transformer": ("", "dit"),
    "vae": ("encoder", "vae_encode"),
}
_VAE_DECODE = ("vae", "decoder", "vae_decode")

_active: Optional["StageClock"] = None
_HOOKED_FLAG = "_acestep_stage_hooked"  # on the module itself: ids get reused after garbage collection


class StageClock:
    def __init__(self, cuda: bool = False):
        self._seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._cuda = cuda
        self._started: dict[int, Any] = {}
        self._events: list[tuple[str, Any, Any]] = []  # CUDA: (stage, start event, end event), read later

    def _mark(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self, key: int) -> None:
        self._started[key] = self._mark()

    def end(self, stage: str, key: int) -> None:
        start = self._started.pop(key, None)
        if start is None:
            return
        stop = self._mark()
        if self._cuda:
            self._events.append((stage, start, stop))
        else:
            self.add(stage, stop - start)

    def add(self, stage: str, seconds: float) -> None:
        self._seconds[stage] += seconds
        self.calls[stage] += 1

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per stage (on CUDA this waits for the last recorded stage to finish on the device)."""
        if self._events:
            self._events[-1][2].synchronize()
            for stage, start, stop in self._events:
                self.add(stage, start.elapsed_time(stop) / 1000.0)
            self._events = []
        return self._seconds

    def rounded(self) -> dict[str, float]:
        return {f"{k}_s": round(v, 4) for k, v in sorted(self.seconds.items())}


@contextlib.contextmanager
def recording(clock: Optional[StageClock]) -> Iterator[Optional[StageClock]]:
    """Make `clock` the one the hooks record into (None: record nothing)."""
    global _active
    previous, _active = _active, clock
    try:
        yield clock
    finally:
        _active = previous


def install_hooks(pipe) -> None:
    targets = [(comp, sub, stage) for comp, (sub, stage) in STAGES.items()] + [_VAE_DECODE]
    for comp, sub, stage in targets:
        module = getattr(pipe, comp, None)
        if module is None or not isinstance(module, torch.nn.Module):
            continue
        if sub:
            module = getattr(module, sub)
        if getattr(module, _HOOKED_FLAG, False):
            continue
        setattr(module, _HOOKED_FLAG, True)
        module.register_forward_pre_hook(_pre_hook())
        module.register_forward_hook(_post_hook(stage))


def hooked(module: torch.nn.Module) -> bool:
    return bool(getattr(module, _HOOKED_FLAG, False))


def _pre_hook():
    def hook(module, args):
        clock = _active
        if clock is not None:
            clock.begin(id(module))
    return hook


def _post_hook(stage: str):
    def hook(module, args, output):
        clock = _active
        if clock is not None:
            clock.end(stage, id(module))
    return hook
