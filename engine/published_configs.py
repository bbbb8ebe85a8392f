"""Component sizes of the published ACE-Step 1.5 models, for building full-size random-weight stand-ins.

Used only by the benchmark (`bench/engine.py --full-size`) and `acestep-models make-tiny --full-size`: a random-weight
pipeline with the real shapes has the real compute cost, so GPU timings are meaningful even without weights.

Sources (checked 2026-11): the DiT / condition-encoder / audio-tokenizer values are the `AceStepConfig` defaults of
ACE-Step 1.5 turbo (acestep/models/.../configuration_acestep_v15.py, mirrored in the checkpoint's config.json) as
split by diffusers' `scripts/convert_ace_step_to_diffusers.py`; the VAE values are the published `vae/config.json`;
the text encoder is Qwen3-Embedding-0.6B's config.json.

The XL DiTs (acestep-v15-xl-turbo / -xl-sft / -xl-base, published 2026-04) widen and deepen only the transformer;
their condition encoder and audio (de)tokenizer keep the 2B widths, which the transformer's condition_embedder
projects up from. Sources (checked 2026-12): modelscope/DiffSynth-Studio diffsynth/configs/model_configs.py (the
XL checkpoint's DiT kwargs; its condition encoder and tokenizer entries use the 2B defaults), diffusers 0.42's
AceStepTransformer1DModel (encoder_hidden_size 2048 under a 2560-wide XL DiT), ServeurpersoCom/acestep.cpp
(docs/ARCHITECTURE.md: 32 layers, H=2560, ~9.5 GB in bf16; src/cond-enc.h, src/fsq-detok.h: 2048-wide encoders
for both sizes). Cross-check: these shapes give 4.17 B DiT parameters + 0.82 B of encoders, 9.97 GB in bf16 and
19.9 GB in float32 -- the xl-base download is ~19 GB (float32), as the 2B shapes give turbo's published 4.79 GB.
"""
from __future__ import annotations

# 2B DiT ("acestep-v15-turbo"; base/sft share the shapes, with is_turbo false).
TRANSFORMER = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    in_channels=192,  # noisy latent 64 + source latent 64 + chunk mask 64
    audio_acoustic_hidden_dim=64,
    patch_size=2,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    sliding_window=128,
)

# XL DiT ("acestep-v15-xl-turbo"; xl-sft / xl-base share the shapes): 32 layers alternating sliding / full attention
# like the 2B, fed by the 2048-wide condition encoder below.
XL_TRANSFORMER = dict(
    TRANSFORMER,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=32,
    num_attention_heads=32,
    encoder_hidden_size=2048,
)


def is_xl_name(model_name: str) -> bool:
    """An XL DiT by its published name (acestep-v15-xl-turbo, -xl-sft, -xl-base and their variants)."""
    return "-xl-" in f"{model_name.lower()}-"


def transformer_config(model_name: str) -> dict:
    """The full-size transformer shapes of a published DiT name: XL or 2B."""
    return XL_TRANSFORMER if is_xl_name(model_name) else TRANSFORMER


CONDITION_ENCODER = dict(
    hidden_size=2048,
    intermediate_size=6144,
    text_hidden_dim=1024,
    timbre_hidden_dim=64,
    num_lyric_encoder_hidden_layers=8,
    num_timbre_encoder_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    sliding_window=128,
)

# 5 Hz audio tokenizer / detokenizer (FSQ levels 8*8*8*5*5*5 = 64000 codes).
AUDIO_TOKENIZER = dict(
    hidden_size=2048,
    intermediate_size=6144,
    audio_acoustic_hidden_dim=64,
    pool_window_size=5,
    fsq_dim=2048,
    fsq_input_levels=[8, 8, 8, 5, 5, 5],
    fsq_input_num_quantizers=1,
    num_attention_pooler_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    sliding_window=128,
)
AUDIO_DETOKENIZER = {k: v for k, v in AUDIO_TOKENIZER.items() if not k.startswith("fsq")}

# Oobleck VAE: 48 kHz stereo, hop 2*4*4*6*10 = 1920 samples -> 25 Hz, 64-channel latents.
VAE = dict(
    encoder_hidden_size=128,
    downsampling_ratios=[2, 4, 4, 6, 10],
    channel_multiples=[1, 2, 4, 8, 16],
    decoder_channels=128,
    decoder_input_channels=64,
    audio_channels=2,
    sampling_rate=48000,
)

# Qwen3-Embedding-0.6B.
TEXT_ENCODER = dict(
    vocab_size=151669,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)

FULL_SIZE = dict(
    transformer=TRANSFORMER,
    condition_encoder=CONDITION_ENCODER,
    audio_tokenizer=AUDIO_TOKENIZER,
    audio_token_detokenizer=AUDIO_DETOKENIZER,
    vae=VAE,
    text_encoder=TEXT_ENCODER,
)

# Tiny stand-in: same structure and 25 Hz / 1920-sample hop, far smaller widths. The latent channel count only has to
# agree across the VAE (encoder_hidden_size = 2 * latent channels, decoder_input_channels), the transformer
# (in_channels = 3 * audio_acoustic_hidden_dim), the condition encoder's timbre_hidden_dim (its silence_latent feeds
# the repaint mask) and the audio (de)tokenizer -- 4 channels keep the full-rate VAE convolutions cheap on a CPU.
_TINY_LATENT = 4
_TINY_ATTN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  sliding_window=16)
TINY = dict(
    transformer=dict(num_hidden_layers=2, in_channels=3 * _TINY_LATENT, audio_acoustic_hidden_dim=_TINY_LATENT,
                     patch_size=2, **_TINY_ATTN),
    condition_encoder=dict(text_hidden_dim=32, timbre_hidden_dim=_TINY_LATENT, num_lyric_encoder_hidden_layers=1,
                           num_timbre_encoder_hidden_layers=1, **_TINY_ATTN),
    audio_tokenizer=dict(audio_acoustic_hidden_dim=_TINY_LATENT, pool_window_size=5, fsq_dim=64,
                         fsq_input_levels=[8, 8, 8, 5, 5, 5], fsq_input_num_quantizers=1,
                         num_attention_pooler_hidden_layers=1, **_TINY_ATTN),
    audio_token_detokenizer=dict(audio_acoustic_hidden_dim=_TINY_LATENT, pool_window_size=5,
                                 num_attention_pooler_hidden_layers=1, **_TINY_ATTN),
    vae=dict(encoder_hidden_size=2 * _TINY_LATENT, downsampling_ratios=[2, 4, 4, 6, 10],
             channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4, decoder_input_channels=_TINY_LATENT,
             audio_channels=2, sampling_rate=48000),
    text_encoder=dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096),
)
# Tiny XL stand-in: as the published XL, only the transformer is wider (and has more heads) than the tiny encoders
# above, so a tiny XL checkpoint exercises the condition_embedder's projection from encoder_hidden_size up.
TINY_XL_TRANSFORMER = dict(TINY["transformer"], hidden_size=96, intermediate_size=192, num_attention_heads=6,
                           encoder_hidden_size=_TINY_ATTN["hidden_size"])


def tiny_transformer_config(model_name: str) -> dict:
    """The tiny transformer shapes of a DiT name: XL-like for an XL name, else the 2B-like ones."""
    return TINY_XL_TRANSFORMER if is_xl_name(model_name) else TINY["transformer"]
