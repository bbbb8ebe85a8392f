"""Source audio -> the DiT checkpoint's 5 Hz audio codes (the reverse of what cover-from-codes decodes).

The path is the pipeline's own: VAE encode to 25 Hz latents, then the audio tokenizer (attention pooler + FSQ)
over windows of 5 latents. Used by full_analysis_only, where the LM then "understands" the codes.
"""
from __future__ import annotations

import torch
from diffusers import AceStepPipeline

from engine.types import GenerationError


@torch.inference_mode()
def audio_to_codes(pipe: AceStepPipeline, audio: torch.Tensor) -> list[int]:
    """`audio`: float32 [channels, samples] at the VAE's rate. Returns one code per 0.2 s of audio."""
    if pipe.audio_tokenizer is None:
        raise GenerationError("this DiT checkpoint has no audio tokenizer, so it cannot turn audio into codes; "
                              "use a checkpoint converted with its tokenizer weights")
    vae = pipe.vae
    device = next(vae.parameters()).device
    dtype = next(pipe.audio_tokenizer.parameters()).dtype
    # The distribution's mean, not a sample: the same audio always gives the same codes.
    latents = vae.encode(audio.unsqueeze(0).to(device=device, dtype=vae.dtype)).latent_dist.mean
    latents = latents.transpose(1, 2).to(dtype=dtype)
    silence = pipe.condition_encoder.silence_latent.to(device=device, dtype=dtype)
    _, indices = pipe.audio_tokenizer.tokenize(latents, silence)
    return [int(i) for i in indices[0, :, 0].tolist()]
