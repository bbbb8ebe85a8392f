"""The XL timbre embedding as upstream's XL model computes it (engine/xl_timbre.py): the encoder's special token
in front of the embedded frames, pooled. Checked against a reference built here from the encoder's own
submodules with rotary tables and masks written out as upstream builds them; the 2B's output stays bit-identical
to diffusers' stock forward; an engine serving a 2B and an XL does not share their condition encoder."""
from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.ace_step.modeling_ace_step import AceStepTimbreEncoder

from engine import published_configs, xl_timbre
from engine.weights.checkpoints import is_xl
from engine.weights.random_pipeline import build_random_pipeline

XL, XL_SFT, TWO_B = "acestep-v15-xl-turbo", "acestep-v15-xl-sft", "acestep-v15-turbo"


def upstream_timbre(timbre, packed: torch.Tensor, order_mask: torch.Tensor, special_token: bool = True):
    """Upstream's XL forward, step by step: embed, special token first, layers at positions 0..T with the
    bidirectional sliding-window mask on sliding layers (none on full ones), norm, pool position 0, unpack.
    Without the special token: upstream's 2B forward."""
    x = torch.nn.functional.linear(packed, timbre.embed_tokens.weight, timbre.embed_tokens.bias)  # no hook
    if special_token:
        x = torch.cat([timbre.special_token.expand(x.shape[0], 1, -1), x], dim=1)
    n, dim = x.shape[1], timbre.head_dim
    positions = torch.arange(n, dtype=torch.float32)
    inv_freq = 1.0 / timbre.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # Qwen3's rotate-half layout
    rope = (angles.cos(), angles.sin())
    far = (positions[:, None] - positions[None, :]).abs() > timbre.sliding_window
    sliding = torch.zeros(n, n).masked_fill(far, torch.finfo(torch.float32).min)[None, None]
    for i, layer in enumerate(timbre.layers):
        x = layer(x, rope, sliding if i % 2 == 0 else None)  # upstream's layer_types: sliding, full, sliding, ...
    return timbre.unpack_timbre_embeddings(timbre.norm(x)[:, 0], order_mask)


def two_layer_timbre_encoder() -> AceStepTimbreEncoder:
    """The tiny encoder's widths with a full-attention layer after the sliding one (the tiny pipeline has one)."""
    spec = published_configs.TINY["condition_encoder"]
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "sliding_window")
    torch.manual_seed(1)
    return AceStepTimbreEncoder(timbre_hidden_dim=spec["timbre_hidden_dim"], num_timbre_encoder_hidden_layers=2,
                                **{k: spec[k] for k in keys})


@pytest.fixture(scope="module")
def pipes():
    # each its own condition encoder (same seed: identical weights), so hooking the XL's cannot reach the 2B's
    return {name: build_random_pipeline(name) for name in (XL, TWO_B)}


@pytest.fixture(scope="module")
def references():
    """Three packed references of 40 frames (more than the sliding window of 16) for two batch items."""
    spec = published_configs.TINY["condition_encoder"]
    generator = torch.Generator().manual_seed(5)
    return torch.randn(3, 40, spec["timbre_hidden_dim"], generator=generator), torch.tensor([0, 0, 1])


@torch.no_grad()
@pytest.mark.parametrize("encoder", ["xl-pipeline", "two-layer"])
def test_the_xl_timbre_embedding_is_upstreams(references, encoder):
    pipe = build_random_pipeline(XL) if encoder == "xl-pipeline" else None  # fresh: its stock output comes first
    timbre = pipe.condition_encoder.timbre_encoder if pipe is not None else two_layer_timbre_encoder()
    packed, order = references
    stock, stock_mask = timbre(packed, order)
    # the reference's rotary tables and masks are diffusers': without the token it gives the stock output
    torch.testing.assert_close(upstream_timbre(timbre, packed, order, special_token=False)[0], stock,
                               rtol=1e-5, atol=1e-5)
    keys = list(timbre.state_dict())
    if pipe is not None:
        assert xl_timbre.install(pipe) is True
    else:
        xl_timbre.prefix_special_token(timbre)
    xl_timbre.prefix_special_token(timbre)  # again (a shared encoder): still one hook
    assert len(timbre.embed_tokens._forward_hooks) == 1 and xl_timbre.is_installed(timbre)
    assert list(timbre.state_dict()) == keys  # adapters, the converted cache and fingerprints see the same module

    embedding, mask = timbre(packed, order)
    expected, expected_mask = upstream_timbre(timbre, packed, order)
    assert embedding.shape == (2, 2, timbre.config.hidden_size)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, expected_mask) and torch.equal(mask, stock_mask)
    assert not torch.allclose(embedding, stock, atol=1e-3)  # diffusers' stock forward pools the first frame


@torch.no_grad()
def test_a_2b_timbre_encoder_is_left_as_diffusers_has_it(pipes, references):
    pipe = pipes[TWO_B]
    timbre = pipe.condition_encoder.timbre_encoder
    packed, order = references
    before = timbre(packed, order)
    assert xl_timbre.install(pipe) is False
    assert not timbre.embed_tokens._forward_hooks and not xl_timbre.is_installed(timbre)
    after = timbre(packed, order)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_xl_is_told_by_the_widths_not_the_name(pipes):
    assert is_xl(published_configs.XL_TRANSFORMER, published_configs.CONDITION_ENCODER)
    assert not is_xl(published_configs.TRANSFORMER, published_configs.CONDITION_ENCODER)
    xl, two_b = pipes[XL], pipes[TWO_B]
    assert is_xl(xl.transformer.config, xl.condition_encoder.config)
    assert not is_xl(two_b.transformer.config, two_b.condition_encoder.config)


def test_an_engine_hooks_its_xl_and_shares_no_condition_encoder_between_an_xl_and_a_2b(tmp_path):
    """Tiny 2B and XL checkpoints built with one seed hold byte-identical condition encoders: shared, the XL's hook
    would change the 2B's timbre embedding too. Loaded with int8 DiTs and offload forced, an XL generation's timbre
    embedding is upstream's."""
    from engine.config import EngineConfig
    from engine.request import GenerationRequest
    from engine.service import Engine
    from engine.weights.checkpoints import build_tiny_checkpoint

    for name in (TWO_B, XL, XL_SFT):
        build_tiny_checkpoint(tmp_path / name, seed=0, model_name=name)
    assert (tmp_path / TWO_B / "condition_encoder" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / XL / "condition_encoder" / "diffusion_pytorch_model.safetensors").read_bytes()
    engine = Engine.load(EngineConfig(checkpoint_dir=str(tmp_path), model_names=[TWO_B, XL, XL_SFT],
                                      allow_download=False, device="cpu", dtype="float32", warmup="false",
                                      quantize="int8", offload="modules"))
    two_b, xl, xl_sft = (engine.model(name).pipe for name in (TWO_B, XL, XL_SFT))
    assert two_b.vae is xl.vae  # the rest is still shared
    assert two_b.condition_encoder is not xl.condition_encoder and xl.condition_encoder is xl_sft.condition_encoder
    timbre = xl.condition_encoder.timbre_encoder
    assert xl_timbre.is_installed(timbre) and len(timbre.embed_tokens._forward_hooks) == 1  # once for both XLs
    assert not xl_timbre.is_installed(two_b.condition_encoder.timbre_encoder)
    assert not two_b.condition_encoder.timbre_encoder.embed_tokens._forward_hooks

    calls = []
    handle = timbre.register_forward_hook(lambda _m, args, out: calls.append((args, out)))
    try:
        engine.generate(GenerationRequest(prompt="xl", lyrics="[instrumental]", audio_duration=10.0, inference_steps=2,
                                          seeds=[1], audio_format="wav", model=XL), encode=False)
    finally:
        handle.remove()
    assert engine.offloader is not None and engine.offloader.moves > 0
    (packed, order), (embedding, _mask) = calls[0]  # the silence latent: no reference audio
    with torch.no_grad():
        torch.testing.assert_close(embedding, upstream_timbre(timbre, packed, order)[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_audio_tokenizers_quantizer_runs_in_float32_in_a_bf16_pipeline_as_upstreams_xl():
    """Upstream's XL code casts the FSQ quantizer's weights and input to float32 for the call (cover / repaint
    source codes); diffusers' quantizer computes in float32 whatever the dtype, so nothing is patched: this pins it
    (computed in bf16 instead, 10 of these 72 indices differ)."""
    import copy

    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenizer

    torch.manual_seed(2)
    quantizer = AceStepAudioTokenizer(**published_configs.TINY["audio_tokenizer"]).to(torch.bfloat16).quantizer
    pooled = torch.randn(2, 6, quantizer.project_in.in_features, dtype=torch.bfloat16) * 4
    codes, indices = quantizer(pooled)
    codes32, indices32 = copy.deepcopy(quantizer).float()(pooled.float())  # upstream: float32 weights and input
    assert codes.dtype == torch.bfloat16 and torch.equal(indices, indices32)
    assert torch.equal(codes, codes32.to(torch.bfloat16))
