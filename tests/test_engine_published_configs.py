"""The full-size random-weight build uses the published ACE-Step 1.5 shapes (checked on the meta device: no memory)."""
from __future__ import annotations

import math

import torch

from engine import published_configs as pc
from engine.weights.random_pipeline import build_shared_components, build_transformer


def _billions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def test_full_size_components_have_published_shapes():
    with torch.device("meta"):
        dit = build_transformer("acestep-v15-turbo", size="full")
        shared = build_shared_components(size="full")
    assert dit.config.hidden_size == 2048 and dit.config.num_hidden_layers == 24 and dit.config.is_turbo
    assert dit.config.in_channels == 3 * dit.config.audio_acoustic_hidden_dim == 192
    assert 1.4 < _billions(dit) < 1.8  # the 2B model: DiT plus ~0.6B condition encoder
    assert 0.55 < _billions(shared["text_encoder"]) < 0.65  # Qwen3-Embedding-0.6B
    assert shared["condition_encoder"].config.text_hidden_dim == shared["text_encoder"].config.hidden_size
    vae = shared["vae"]
    assert vae.hop_length == 1920 and vae.sampling_rate == 48000  # 25 Hz latents at 48 kHz
    assert math.prod(shared["audio_tokenizer"].config.fsq_input_levels) == 64000  # codes 0-63999


def test_tiny_config_keeps_the_published_latent_rate():
    import math

    assert math.prod(pc.TINY["vae"]["downsampling_ratios"]) == 1920
    latent = pc.TINY["transformer"]["audio_acoustic_hidden_dim"]
    assert pc.TINY["transformer"]["in_channels"] == 3 * latent
    assert pc.TINY["vae"]["encoder_hidden_size"] == 2 * latent == 2 * pc.TINY["vae"]["decoder_input_channels"]
    assert pc.TINY["condition_encoder"]["timbre_hidden_dim"] == latent


def test_full_size_xl_dit_has_the_published_xl_shapes_and_the_2b_encoders():
    """The XL shapes reproduce the published sizes: a ~4B DiT, and DiT + encoders ~19 GB in float32 (xl-base's
    download) as the 2B shapes give turbo's 4.79 GB in bf16."""
    from engine.adapter_manifest import published_shape

    with torch.device("meta"):
        xl = build_transformer("acestep-v15-xl-sft", size="full")
        two_b = build_transformer("acestep-v15-turbo", size="full")
        shared = build_shared_components(size="full")
    assert (xl.config.hidden_size, xl.config.num_hidden_layers, xl.config.num_attention_heads) == (2560, 32, 32)
    assert not xl.config.is_turbo
    assert xl.condition_embedder.in_features == shared["condition_encoder"].config.hidden_size == 2048
    encoders = sum(_billions(shared[k]) for k in ("condition_encoder", "audio_tokenizer", "audio_token_detokenizer"))
    assert 3.9 < _billions(xl) < 4.4
    assert 18.5 < (_billions(xl) + encoders) * 4 < 20.5  # GB in float32
    assert 4.7 < (_billions(two_b) + encoders) * 2 < 4.9  # GB in bf16
    assert published_shape("acestep-v15-xl-turbo").hidden_size == 2560
    assert published_shape("acestep-v15-turbo").hidden_size == 2048
    assert pc.is_xl_name("acestep-v15-xl-base") and not pc.is_xl_name("acestep-v15-turbo-shift3")
