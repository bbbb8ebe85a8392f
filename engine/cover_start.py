"""Upstream's `cover_noise_strength`: a cover starts from its source renoised instead of from pure noise.

Upstream's generate_audio: the noise level 1 - strength is matched to the nearest time t of the step
schedule; the run starts there from  t * noise + (1 - t) * source latents  and takes only the steps from
t on. Strength 0 is pure noise (the default, every step); 1 starts at the schedule's last time, closest
to the source. The source latents are the ones upstream renoises: the source audio's VAE latents, or
what the 5 Hz audio codes decode to when the cover runs from codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import AceStepPipeline
from diffusers.utils.torch_utils import randn_tensor


@dataclass(frozen=True)
class CoverStart:
    strength: float
    schedule: list[float]  # the whole schedule the request asks for
    index: int  # where the run starts in it

    @property
    def time(self) -> float:
        return self.schedule[self.index]

    @property
    def remaining(self) -> list[float]:
        return self.schedule[self.index:]


def plan(pipe: AceStepPipeline, strength: float, steps: int, shift: float,
         timesteps: Optional[list[float]]) -> CoverStart:
    """Where a cover with this strength starts, on the schedule the pipeline would run (its own function)."""
    schedule = [float(t) for t in pipe._get_timestep_schedule(num_inference_steps=steps, shift=shift,
                                                               dtype=torch.float32, timesteps=timesteps).tolist()]
    level = 1.0 - strength
    nearest = min(schedule, key=lambda t: abs(t - level))  # the first of equals, as upstream's min()
    return CoverStart(strength=strength, schedule=schedule, index=schedule.index(nearest))


@torch.no_grad()
def source_latents(pipe: AceStepPipeline, batch: int, src_audio: Optional[torch.Tensor],
                   audio_codes: Optional[object]) -> torch.Tensor:
    """[batch, frames, channels] latents of the source, through the pipeline's own preparation: the codes'
    detokenized latents when the cover runs from codes (as the pipeline does), else the audio's VAE latents
    (asked as text2music, which skips the cover's tokenization)."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    codes = [audio_codes] if isinstance(audio_codes, str) else list(audio_codes or [])
    if any(c.strip() for c in codes):
        latents, _ = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=batch, audio_codes=audio_codes)
    else:
        latents, _ = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=batch, src_audio=src_audio,
                                              task_type="text2music")
    return latents


def start_latents(start: CoverStart, clean: torch.Tensor, generators: list) -> torch.Tensor:
    """The run's first latents: the noise the pipeline would draw for these seeds, mixed with the source."""
    noise = randn_tensor(tuple(clean.shape), generator=generators, device=clean.device, dtype=clean.dtype)
    return start.time * noise + (1.0 - start.time) * clean
