"""Per-stage wall-clock timing of pipeline components, measured with forward hooks.

Hooks are installed once per module (shared modules are hooked once) and only record while a `StageClock` is
active, so an idle engine pays nothing. On CUDA the hooks synchronise the device so a stage's time is its own.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Optional

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
    def __init__(self, sync_cuda: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._sync = sync_cuda
        self._started: dict[int, float] = {}

    def sync(self) -> None:
        if self._sync:
            torch.cuda.synchronize()

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds
        self.calls[stage] += 1

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - t0)

    def rounded(self) -> dict[str, float]:
        return {f"{k}_s": round(v, 4) for k, v in sorted(self.seconds.items())}


@contextlib.contextmanager
def recording(clock: StageClock) -> Iterator[StageClock]:
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
        module.register_forward_pre_hook(_pre_hook(stage))
        module.register_forward_hook(_post_hook(stage))


def _pre_hook(stage: str):
    def hook(module, args):
        clock = _active
        if clock is not None:
            clock.sync()
            clock._started[id(module)] = time.perf_counter()
    return hook


def _post_hook(stage: str):
    def hook(module, args, output):
        clock = _active
        if clock is not None and id(module) in clock._started:
            clock.sync()
            clock.add(stage, time.perf_counter() - clock._started.pop(id(module)))
    return hook
