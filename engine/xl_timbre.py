"""The XL DiTs' timbre embedding, computed as upstream's XL model computes it.

Upstream's XL model code overrides the 2B timbre encoder's forward: after embedding the reference latents it puts
the encoder's learned `special_token` in front of them (rotary position 0, the frames at 1..T) and pools that
token's output, where the 2B pools the first frame. diffusers 0.42's AceStepTimbreEncoder never reads
`special_token`, so an XL served through it gets another timbre embedding on every call (the timbre encoder runs on
every generation, fed the silence latent when there is no reference audio).

Here a forward hook on `timbre_encoder.embed_tokens` returns the special token followed by the embedded frames.
diffusers' forward then builds its rotary tables (positions 0..T) and its sliding-window mask over T+1 positions --
it has no padding mask there that would be one short -- runs the layers, norms and pools index 0: the special
token's output, as upstream. Nothing is forked and the module tree is unchanged: state-dict keys, the converted
cache and component fingerprints stay as they are, the token moves with the encoder under offload
(engine/offload.py), and neither quantisation nor adapters touch the condition encoder (both act on the
transformer). A condition encoder is shared only between models that agree on this (engine/service.py).
"""
from __future__ import annotations

import torch

from engine.weights.checkpoints import is_xl

_MARK = "_acestep_xl_special_token"


def install(pipe) -> bool:
    """Prefix the special token in `pipe`'s timbre encoder when the pipeline is an XL; True when it is one."""
    if not is_xl(pipe.transformer.config, pipe.condition_encoder.config):
        return False
    prefix_special_token(pipe.condition_encoder.timbre_encoder)
    return True


def prefix_special_token(timbre_encoder: torch.nn.Module) -> None:
    """Hook `timbre_encoder.embed_tokens` so its output starts with `timbre_encoder.special_token`; once per module
    (a condition encoder shared by two XL models is hooked once)."""
    if getattr(timbre_encoder, _MARK, False):
        return

    def prepend(_embed, _args, embedded: torch.Tensor) -> torch.Tensor:
        # read at call time: offload and .to() move the parameter with the encoder
        token = timbre_encoder.special_token.to(device=embedded.device, dtype=embedded.dtype)
        return torch.cat([token.expand(embedded.shape[0], 1, -1), embedded], dim=1)

    timbre_encoder.embed_tokens.register_forward_hook(prepend)
    setattr(timbre_encoder, _MARK, True)


def is_installed(timbre_encoder: torch.nn.Module) -> bool:
    return bool(getattr(timbre_encoder, _MARK, False))


__all__ = ["install", "is_installed", "prefix_special_token"]
