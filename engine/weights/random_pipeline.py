"""Build randomly initialised AceStepPipelines (tiny for tests/demo, full-size for GPU benchmarks).

Nothing here is a real model: every weight is random and the audio it makes is noise. Callers label it as such
(see `checkpoints.DEMO_MARKER`).
"""
from __future__ import annotations

import zlib

import torch
from diffusers import AceStepPipeline, AceStepTransformer1DModel, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.ace_step.modeling_ace_step import (
    AceStepAudioTokenDetokenizer,
    AceStepAudioTokenizer,
    AceStepConditionEncoder,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from engine import published_configs

_SPECIALS = ["<pad>", "[UNK]", "<|endoftext|>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII + newline/tab); anything else maps to [UNK].

    The real Qwen3 BPE tokenizer cannot be built offline; a char tokenizer gives longer sequences than BPE, so timings
    taken with it are, if anything, pessimistic for the text encoder.
    """
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   eos_token="<|endoftext|>", model_max_length=8192)
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    return fast


def is_turbo_name(model_name: str) -> bool:
    return "turbo" in model_name.lower()


def build_shared_components(size: str = "tiny", seed: int = 0) -> dict:
    """VAE, text encoder, tokenizer, condition encoder and audio (de)tokenizer.

    Seeded only by `seed`, so two variants built with the same seed get byte-identical shared components -- the
    engine then loads them once (it compares component files, as it would for real checkpoints).
    """
    spec = _spec(size)
    torch.manual_seed(seed)
    vae = AutoencoderOobleck(**spec["vae"])
    if size == "tiny":
        _let_signal_through(vae)
    te_cfg = dict(spec["text_encoder"])
    text_encoder = Qwen3Model(Qwen3Config(**te_cfg))
    condition_encoder = AceStepConditionEncoder(**spec["condition_encoder"])
    _fill_silence_latent(condition_encoder, seed)
    audio_tokenizer = AceStepAudioTokenizer(**spec["audio_tokenizer"])
    audio_token_detokenizer = AceStepAudioTokenDetokenizer(**spec["audio_token_detokenizer"])
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(), condition_encoder=condition_encoder,
                audio_tokenizer=audio_tokenizer, audio_token_detokenizer=audio_token_detokenizer)


def build_transformer(model_name: str, size: str = "tiny", seed: int = 0) -> AceStepTransformer1DModel:
    """The DiT of one variant; its seed mixes in the name so variants make different audio. An XL name gets the XL
    shapes, full-size or tiny: a transformer wider than the (shared, same for both sizes) condition encoder."""
    torch.manual_seed((seed * 1_000_003 + zlib.crc32(model_name.encode())) % 2**32)
    turbo = is_turbo_name(model_name)
    _spec(size)  # an unknown size is refused here too
    shapes = (published_configs.transformer_config(model_name) if size == "full"
              else published_configs.tiny_transformer_config(model_name))
    return AceStepTransformer1DModel(**shapes, is_turbo=turbo,
                                     model_version="turbo" if turbo else "base")


def build_random_pipeline(model_name: str, size: str = "tiny", seed: int = 0,
                          shared: dict | None = None) -> AceStepPipeline:
    shared = shared or build_shared_components(size, seed)
    # ACE-Step feeds sigmas in [0, 1] itself: the scheduler must pass them through unchanged.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    return AceStepPipeline(transformer=build_transformer(model_name, size, seed), scheduler=scheduler, **shared)


@torch.no_grad()
def _fill_silence_latent(condition_encoder: AceStepConditionEncoder, seed: int) -> None:
    """Real checkpoints ship the VAE latent of silence here (silence_latent.pt); the class starts with zeros. Seeded
    non-zero values (from their own generator, so no other weight changes) make a lost or untransposed silence
    latent show up in the converted model's audio."""
    generator = torch.Generator().manual_seed(seed)
    buffer = condition_encoder.silence_latent
    buffer.copy_(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))


@torch.no_grad()
def _let_signal_through(vae: AutoencoderOobleck, encoder_gain: float = 1.5) -> None:
    """With default init, a deep random Oobleck VAE outputs almost only its biases (decodes of two unrelated latents
    correlate at 0.99999), so the demo's audio would not depend on seeds, prompts or source audio. Zero the biases and
    give the tiny encoder a gain (1.5, measured: latent means of order 1 for a 0.3-amplitude tone) so signal flows."""
    for name, param in vae.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif name.startswith("encoder.") and name.endswith("weight_g"):
            param.mul_(encoder_gain)


def _spec(size: str) -> dict:
    if size == "tiny":
        return published_configs.TINY
    if size == "full":
        return published_configs.FULL_SIZE
    raise ValueError(f"unknown size {size!r} (tiny or full)")
