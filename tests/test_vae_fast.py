"""engine/vae_fast: the channels-last decode with a fused Snake decodes what the stock decoder decodes.

Tiny random Oobleck VAEs (a few thousand parameters); the full-size speed is in bench/vae_cpu.py. The
compiled Snake is checked for equality there too (a cold inductor compile costs tens of seconds)."""
from __future__ import annotations


import pytest
import torch
from diffusers import AutoencoderOobleck

from engine import vae_fast, vae_progress

TINY = dict(encoder_hidden_size=8, downsampling_ratios=[2, 3, 2], channel_multiples=[1, 2, 4], decoder_channels=8,
            decoder_input_channels=4, audio_channels=2, sampling_rate=48000)


def tiny_vae(seed: int = 0) -> AutoencoderOobleck:
    torch.manual_seed(seed)
    vae = AutoencoderOobleck(**TINY).eval()
    with torch.no_grad():  # non-trivial Snakes (they start at alpha = beta = 1)
        for name, param in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                param.normal_(0.0, 0.5)
    return vae


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(2, TINY["decoder_input_channels"], 40, generator=torch.Generator().manual_seed(1))


def test_float32_fast_decode_equals_the_stock_decode(latent):
    stock = tiny_vae()
    fast = tiny_vae()
    info = vae_fast.install(fast, compile_snake=False)
    assert info is not None and info.snake == "eager" and info.folded == 2 + 7 * len(TINY["downsampling_ratios"])
    assert vae_fast.install(fast, compile_snake=False) is None  # once only
    want, got = decode(stock, latent), decode(fast, latent)
    assert got.shape == want.shape and got.is_contiguous()
    assert want.abs().max() > 0.05  # the decode carries signal, not only biases
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_bf16_fast_decode_is_as_close_to_float32_as_the_stock_bf16_decode(latent):
    truth = decode(tiny_vae(), latent)
    stock = tiny_vae().to(torch.bfloat16)
    fast = tiny_vae().to(torch.bfloat16)
    vae_fast.install(fast, compile_snake=False)
    z = latent.to(torch.bfloat16)
    stock_err = (decode(stock, z).float() - truth).abs().max().item()
    fast_err = (decode(fast, z).float() - truth).abs().max().item()
    assert fast_err <= 1.5 * stock_err + 1e-3, (fast_err, stock_err)


def test_tiled_decode_and_progress_hooks_still_work(latent):
    stock, fast = tiny_vae(), tiny_vae()
    vae_fast.install(fast, compile_snake=False)
    for vae in (stock, fast):
        vae.use_tiling, vae.tile_latent_min_length, vae.tile_latent_overlap = True, 16, 4
    fractions: list[float] = []
    with vae_progress.reporting(fast, fractions.append) as progress:
        progress.expect(latent.shape[-1])
        got = decode(fast, latent)
    torch.testing.assert_close(got, decode(stock, latent), atol=2e-5, rtol=1e-4)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert len(fractions) == 4 * len(TINY["downsampling_ratios"]) * len(vae_progress.decode_windows(40, True, 16, 4))


def encode(vae, audio: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(audio).latent_dist.parameters  # mean and scale, before any sampling


def test_fast_encode_equals_the_stock_encode_in_float32_is_as_close_in_bf16_and_reports_progress():
    hop = 2 * 3 * 2  # TINY's downsampling
    audio = 0.3 * torch.randn(2, TINY["audio_channels"], 40 * hop, generator=torch.Generator().manual_seed(2))
    stock, fast = tiny_vae(), tiny_vae()
    info = vae_fast.install(fast, compile_snake=False)
    assert info is not None and info.encoder_folded == 2 + 7 * len(TINY["downsampling_ratios"])
    fractions: list[float] = []
    with vae_progress.encoding(fast, fractions.append):  # the source-encode hooks still fire, in order
        got = encode(fast, audio)
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    in_use = vae_fast.snake_in_use(fast)  # the encode ran the channels-last path, not the stock one
    assert in_use is not None and in_use["calls"]["eager"] == sum(isinstance(m, Snake1d) for m in fast.encoder.modules())
    want = encode(stock, audio)
    assert got.shape == want.shape == (2, 2 * TINY["decoder_input_channels"], 40) and got.is_contiguous()
    assert want.abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert len(fractions) == 4 * len(TINY["downsampling_ratios"]) and fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    stock_bf16, fast_bf16 = tiny_vae().to(torch.bfloat16), tiny_vae().to(torch.bfloat16)
    vae_fast.install(fast_bf16, compile_snake=False)
    x = audio.to(torch.bfloat16)
    stock_err = (encode(stock_bf16, x).float() - want).abs().max().item()
    fast_err = (encode(fast_bf16, x).float() - want).abs().max().item()
    assert fast_err <= 1.5 * stock_err + 1e-3, (fast_err, stock_err)


def test_without_a_working_compiler_the_snake_stays_eager_and_says_why(latent, monkeypatch):
    def no_compiler(*_a, **_k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    fast = tiny_vae()
    info = vae_fast.install(fast, compile_snake=True)
    assert info is not None and info.snake == "eager" and "no C++ compiler" in info.reason
    torch.testing.assert_close(decode(fast, latent), decode(tiny_vae(), latent), atol=2e-5, rtol=1e-4)
    in_use = vae_fast.snake_in_use(fast)  # what the decode ran, not only what load set up
    assert in_use is not None and in_use["snake"] == "eager" and in_use["calls"]["compiled"] == 0
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    assert in_use["calls"]["eager"] == sum(isinstance(m, Snake1d) for m in fast.decoder.modules())
    assert vae_fast.snake_in_use(tiny_vae()) is None


def test_compile_setting_and_the_default_for_a_tiny_decoder():
    assert vae_fast.compile_setting("TRUE") is True and vae_fast.compile_setting("off") is False
    assert vae_fast.compile_setting("auto") is None
    from entrypoints.bootstrap import engine_config
    from service.config import ConfigError, load_settings

    assert engine_config(load_settings(env={"ACESTEP_VAE_COMPILE": "false"}, dotenv_path=None)).vae_compile == "false"
    with pytest.raises(ConfigError, match="ACESTEP_VAE_COMPILE"):  # refused when settings are built, not at load
        load_settings(env={"ACESTEP_VAE_COMPILE": "maybe"}, dotenv_path=None)
    with pytest.raises(ValueError, match="ACESTEP_VAE_COMPILE"):
        vae_fast.compile_setting("maybe")
    assert vae_fast.prepare(tiny_vae(), torch.device("meta")) is None  # other devices keep the stock decoder
    info = vae_fast.prepare(tiny_vae(), torch.device("cpu"), "auto")  # a tiny decoder: not worth a compile
    assert info is not None and info.snake == "eager" and info.reason == "compile off"
