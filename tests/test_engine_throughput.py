"""Throughput decisions of the engine (issue 14): VAE tiling only when memory requires it, length
buckets, warm-up, stage timings and the GPU flags (torch.compile, CUDA graphs, attention backend).

On CPU the flags can be shown to reach the model and keep it working; their speed-up needs a GPU
and is not measured here.
"""
from __future__ import annotations

import pytest

from engine import memory, plan, speedups, timing
from engine.request import GenerationRequest
from engine.types import GenerationError
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import HOP, TURBO, decode

GB = 1024**3


def req(**kw) -> GenerationRequest:
    base = dict(prompt="lofi piano", lyrics="[verse] la la", audio_duration=10, batch_size=1, audio_format="wav",
                inference_steps=2)
    return GenerationRequest(**{**base, **kw})


# ---------------------------------------------------------------- decisions


def test_vae_decode_memory_estimate_and_tiling_decision():
    # A 240 s song through the published VAE (128 channels at full rate) in bf16: ~19 GiB untiled (measured 18.6,
    # tests/test_engine_memory.py checks the estimate against the measurements)
    one = memory.vae_decode_bytes(1, 240, 128, 2)
    assert memory.vae_decode_bytes(4, 240, 128, 2) == pytest.approx(4 * one, abs=4)
    assert memory.tile_vae_decode(True, one, 40 * GB) is False  # fits: untiled (no overlap to decode twice)
    assert memory.tile_vae_decode(True, one, 20 * GB) is True  # would not fit with headroom: tiled
    assert memory.tile_vae_decode(False, one, 1 * GB) is False  # the request asked for untiled
    assert memory.tile_vae_decode(True, one, None) is False  # unknown: untiled
    assert memory.available_bytes("cpu") > 0  # Linux: MemAvailable


def test_length_buckets_widen_batching_only_when_asked():
    assert plan.length_bucket(35, 0) == 35 and plan.length_bucket(30, 30) == 30 and plan.length_bucket(31, 30) == 60
    a, b = req(audio_duration=35), req(audio_duration=50)
    assert plan.batch_key(a, TURBO) != plan.batch_key(b, TURBO)  # default: equal lengths only
    assert plan.batch_key(a, TURBO, bucket_seconds=30) == plan.batch_key(b, TURBO, bucket_seconds=30)
    assert plan.batch_key(a, TURBO, bucket_seconds=30) != plan.batch_key(req(audio_duration=70), TURBO,
                                                                          bucket_seconds=30)


def test_warm_up_decision():
    assert speedups.warm_up_enabled("auto", "cuda") and not speedups.warm_up_enabled("auto", "cpu")
    assert speedups.warm_up_enabled("true", "cpu") and not speedups.warm_up_enabled("false", "cuda")
    with pytest.raises(GenerationError, match="ACESTEP_WARMUP"):
        speedups.warm_up_enabled("sometimes", "cpu")


def test_cuda_graph_outputs_are_copies_the_next_call_cannot_overwrite():
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    buffer = torch.zeros(4)

    def replay(x):  # what a CUDA-graph replay does: the same output memory, rewritten each call
        buffer.copy_(x)
        return Transformer2DModelOutput(sample=buffer)

    forward = speedups.owning_outputs(replay)
    first = forward(torch.ones(4)).sample
    second = forward(torch.full((4,), 2.0)).sample
    assert first.tolist() == [1.0] * 4 and second.tolist() == [2.0] * 4


def test_compile_options():
    assert speedups.compile_options(False, False, "inductor") is None
    assert speedups.compile_options(True, False, "inductor") == {"backend": "inductor", "mode": "default"}
    # CUDA graphs are inductor's reduce-overhead mode, and imply compiling
    assert speedups.compile_options(False, True, "inductor") == {"backend": "inductor", "mode": "reduce-overhead"}
    assert speedups.compile_options(True, False, "eager") == {"backend": "eager"}


def test_settings_reach_the_engine_config():
    from entrypoints.bootstrap import engine_config
    from service.config import load_settings

    s = load_settings(env={"ACESTEP_COMPILE_DIT": "true", "ACESTEP_CUDA_GRAPHS": "1", "ACESTEP_COMPILE_BACKEND": "eager",
                           "ACESTEP_ATTENTION_BACKEND": "_native_flash", "ACESTEP_WARMUP": "false",
                           "ACESTEP_STAGE_TIMINGS": "false", "ACESTEP_BATCH_LENGTH_BUCKET": "30"}, dotenv_path=None)
    c = engine_config(s)
    assert (c.compile_dit, c.cuda_graphs, c.compile_backend, c.attention_backend) == (True, True, "eager", "_native_flash")
    assert (c.warmup, c.stage_timings, c.length_bucket_seconds) == ("false", False, 30.0)


# ---------------------------------------------------------------- on the tiny model


def test_decode_is_untiled_unless_memory_requires_it(engine, monkeypatch):
    assert engine.generate(req(seeds=[1])).generation_info["vae_decode"] == "untiled"
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)  # a machine with almost nothing free
    tiled = engine.generate(req(seeds=[1]))
    assert tiled.generation_info["vae_decode"] == "tiled"
    assert engine.generate(req(seeds=[1], use_tiled_decode=False)).generation_info["vae_decode"] == "untiled"


def test_a_length_bucket_batch_runs_at_the_longest_and_cuts_each(engine, monkeypatch):
    monkeypatch.setattr(engine.config, "length_bucket_seconds", 30.0)
    short, long = engine.generate_batch([(req(seeds=[3], audio_duration=10), {}), (req(seeds=[4], audio_duration=20), {})])
    assert abs(decode(short.audios[0].data)[0].shape[0] - 10 * 48000) <= HOP
    assert abs(decode(long.audios[0].data)[0].shape[0] - 20 * 48000) <= HOP
    assert any("length bucket" in n and "cut to 10 s" in n for n in short.generation_info["notes"])
    assert not any("length bucket" in n for n in long.generation_info["notes"])


@pytest.fixture(scope="module")
def flagged_engine(tiny_checkpoint_dir):
    """Every flag on, at once: one load (and one warm-up) for all the checks below."""
    from engine.config import EngineConfig
    from engine.service import Engine

    return Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO], allow_download=False,
                                    stage_timings=False, warmup="true", compile_dit=True, compile_backend="eager",
                                    attention_backend="_native_math"))


def test_flags_reach_the_model_and_it_still_generates(flagged_engine):
    pipe = flagged_engine.model(TURBO).pipe
    backends = {getattr(m.processor, "_attention_backend", None) for m in pipe.transformer.modules()
                if hasattr(m, "processor")}
    assert {getattr(b, "value", b) for b in backends} == {"_native_math"}
    assert hasattr(pipe.transformer.forward, "_torchdynamo_orig_callable")  # torch.compile'd (eager backend)
    assert not timing.hooked(pipe.transformer) and not timing.hooked(pipe.vae.decoder)  # timings off: no hooks
    result = flagged_engine.generate(req(seeds=[5]))
    timings = result.generation_info["timings"]
    assert "dit_s" not in timings and timings["pipeline_s"] > 0
    assert abs(decode(result.audios[0].data)[0].shape[0] - 10 * 48000) <= HOP


def test_an_unknown_attention_backend_is_refused_with_the_choices(flagged_engine):
    with pytest.raises(GenerationError, match="unknown ACESTEP_ATTENTION_BACKEND 'fastest'.*_native_flash"):
        speedups.apply(flagged_engine.model(TURBO).pipe, compile_dit=False, cuda_graphs=False,
                       compile_backend="inductor", attention_backend="fastest")
