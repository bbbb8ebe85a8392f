"""Progress from inside the VAE, so a long decode (or a long source's encode) keeps the run watch's stall timer fed.

The pipeline calls `vae.decode` once after the last diffusion step; on CPU that one call is the longest
stage (540 s for a 240 s song in bf16), longer than a stall timeout could safely wait for without news.
Forward hooks on the decoder's blocks (their upsampling convolution and three residual units) report
after each one finishes, weighted by each unit's share of the decoder's compute, so the fraction moves
about evenly in time; a tiled decode reports through every tile. The hooks change no numerics and cost
a Python call per unit. A callback that raises (a cancelled task) stops the decode at the next unit.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch


def decode_windows(frames: int, tiled: bool, tile_frames: int, overlap_frames: int) -> list[int]:
    """Latent frames of each decoder pass for a `frames`-long latent: one pass untiled, else the overlapping
    windows diffusers' AutoencoderOobleck._tiled_decode walks (core `tile - 2 * overlap`, plus the overlap
    each side where there is audio)."""
    if not tiled or frames <= tile_frames:
        return [frames]
    stride = tile_frames - 2 * overlap_frames
    windows = []
    for i in range(math.ceil(frames / stride)):
        start, end = i * stride, min(i * stride + stride, frames)
        windows.append(min(frames, end + overlap_frames) - max(0, start - overlap_frames))
    return windows


def unit_weights(decoder: torch.nn.Module) -> list[tuple[torch.nn.Module, float]]:
    """(module, share of one decoder pass) for every block's upsampling convolution and residual units.

    A unit's cost is about (its output rate) x (its channels)^2: each block raises the rate by its stride
    and halves the channels, so the full-rate blocks, not the first ones, take most of the time."""
    units: list[tuple[torch.nn.Module, float]] = []
    rate = 1.0
    for block in decoder.block:
        rate *= block.conv_t1.stride[0]
        cost = rate * block.conv_t1.out_channels ** 2
        units += [(block.conv_t1, cost), (block.res_unit1, cost), (block.res_unit2, cost), (block.res_unit3, cost)]
    total = sum(c for _, c in units)
    return [(m, c / total) for m, c in units]


class DecodeProgress:
    """Turns the decoder's unit completions into one fraction 0..1 of the whole decode (all tiles)."""

    def __init__(self, vae, report: Callable[[float], None]):
        self.vae, self.report = vae, report
        self.windows: Optional[list[int]] = None
        self._done_frames = 0  # frames of the passes already finished
        self._window = 0  # frames of the pass running now
        self._share = 0.0  # of the running pass
        self.last = 0.0

    def expect(self, latent_frames: int) -> None:
        """The latent length about to be decoded (the engine reads it from the last diffusion step)."""
        vae = self.vae
        self.windows = decode_windows(latent_frames, bool(getattr(vae, "use_tiling", False)),
                                      int(getattr(vae, "tile_latent_min_length", latent_frames)),
                                      int(getattr(vae, "tile_latent_overlap", 0)))

    def _pass_starts(self, frames: int) -> None:
        if self._window:
            self._done_frames += self._window
        self._window, self._share = frames, 0.0

    def _unit_done(self, share: float) -> None:
        self._share = min(1.0, self._share + share)
        total = sum(self.windows) if self.windows else self._window
        fraction = (self._done_frames + self._window * self._share) / max(1, total)
        self.last = max(self.last, min(1.0, fraction))
        self.report(self.last)


def encoder_unit_weights(encoder: torch.nn.Module) -> list[tuple[torch.nn.Module, float]]:
    """(module, share of one encoder pass): each block's residual units run at its input rate and width,
    then its strided convolution lowers the rate."""
    units: list[tuple[torch.nn.Module, float]] = []
    rate = 1.0
    for block in encoder.block:
        cost = rate * block.conv1.in_channels ** 2
        units += [(block.res_unit1, cost), (block.res_unit2, cost), (block.res_unit3, cost), (block.conv1, cost)]
        rate /= block.conv1.stride[0]
    total = sum(c for _, c in units)
    return [(m, c / total) for m, c in units]


@contextlib.contextmanager
def encoding(vae, report: Callable[[float], None]) -> Iterator[None]:
    """Hooks on `vae.encoder` (source and reference audio: a 240 s source is minutes on CPU): `report(fraction
    of the running encoder pass)`, never lower than the last report."""
    state = {"pass": 0.0, "last": 0.0}

    def starts(_m, _a):
        state["pass"] = 0.0

    def unit_done(share: float) -> None:
        state["pass"] = min(1.0, state["pass"] + share)
        state["last"] = max(state["last"], state["pass"])
        report(state["last"])

    handles = [vae.encoder.register_forward_pre_hook(starts)]
    for module, share in encoder_unit_weights(vae.encoder):
        handles.append(module.register_forward_hook(lambda _m, _a, _o, s=share: unit_done(s)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def reporting(vae, report: Callable[[float], None]) -> Iterator[DecodeProgress]:
    """Hooks on `vae.decoder` for the duration of the block; `report(fraction)` after each unit."""
    progress = DecodeProgress(vae, report)
    decoder = vae.decoder
    handles = [decoder.register_forward_pre_hook(lambda _m, args: progress._pass_starts(int(args[0].shape[-1])))]
    for module, share in unit_weights(decoder):
        handles.append(module.register_forward_hook(lambda _m, _a, _o, s=share: progress._unit_done(s)))
    try:
        yield progress
    finally:
        for handle in handles:
            handle.remove()
