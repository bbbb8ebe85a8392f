"""Engine generation end to end on tiny random-weight models (CPU): every task type, seeds, formats, errors."""
from __future__ import annotations

import numpy as np
import pytest

from engine import memory, plan
from engine.request import GenerationRequest
from engine.types import GenerationCancelled, GenerationError, Metas
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import BASE, HOP, TURBO, decode, wav_bytes


def req(**kw) -> GenerationRequest:
    base = dict(prompt="lofi piano", lyrics="[verse] la la", audio_duration=10, batch_size=1, audio_format="wav")
    base.update(kw)
    return GenerationRequest(**base)


def samples(result, i=0) -> np.ndarray:
    return decode(result.audios[i].data)[0]


def test_text2music_returns_labelled_48k_stereo_audio(engine):
    result = engine.generate(req(seeds=[7], bpm=120, key_scale="C major", time_signature="4"))
    audio, sr = decode(result.audios[0].data)
    assert sr == 48000 and audio.shape[1] == 2
    assert abs(audio.shape[0] - 10 * 48000) <= HOP
    assert np.abs(audio).max() > 0.1  # not silence
    assert result.dit_model == TURBO and result.lm_model == "none"
    assert result.metas == Metas(bpm=120, duration=10.0, key_scale="C major", time_signature="4")
    info = result.generation_info
    assert info["random_weights"] is True and "noise" in info["notice"]
    assert info["model"] == TURBO and info["device"] == "cpu" and info["lm"] == "none"
    assert info["seeds"] == [7] and [a.seed for a in result.audios] == [7]
    for stage in ("text_encoding_s", "dit_s", "vae_decode_s", "audio_encoding_s", "pipeline_s"):
        assert info["timings"][stage] > 0, stage


def test_unknown_metas_are_none_and_default_duration_is_fixed(engine, monkeypatch):
    # These tiny models have random weights: the engine renders engine.plan's demo length (30 s; a real model's
    # default is 120 s, both pinned by tests/test_engine_plan.py), set to 12 s here to keep this run cheap.
    monkeypatch.setattr(plan, "DEMO_SECONDS", 12.0)
    result = engine.generate(req(audio_duration=None, inference_steps=2))
    assert result.metas == Metas(duration=12.0)  # nothing else known (the presenters show "N/A")
    assert abs(decode(result.audios[0].data)[0].shape[0] - 12 * 48000) <= HOP
    assert any("default 12 s (a random-weight demo model's; a real model's is 120 s)" in n
               for n in result.generation_info["notes"])


def test_same_seed_same_audio_different_seed_different_audio(engine):
    a = engine.generate(req(seeds=[11]))
    b = engine.generate(req(seeds=[11]))
    c = engine.generate(req(seeds=[12]))
    assert a.audios[0].data == b.audios[0].data
    assert not np.allclose(samples(a), samples(c), atol=1e-3)


def test_batch_seeds_fill_in_and_each_item_follows_its_own_seed(engine):
    batch = engine.generate(req(batch_size=3, seeds=[100]))
    assert [a.seed for a in batch.audios] == [100, 101, 102]
    assert len(batch.audios) == 3
    alone = engine.generate(req(seeds=[101]))
    # item 1 of the batch used seed 101: same audio as a batch of one with that seed
    np.testing.assert_allclose(samples(batch, 1), samples(alone), atol=2e-3)
    assert not np.allclose(samples(batch, 0), samples(batch, 1), atol=1e-3)


def test_random_seeds_are_reported(engine):
    result = engine.generate(req(batch_size=2, seeds=None))
    seeds = result.generation_info["seeds"]
    assert len(seeds) == 2 and seeds == [a.seed for a in result.audios]
    again = engine.generate(req(batch_size=1, seeds=[seeds[1]]))
    np.testing.assert_allclose(samples(result, 1), samples(again), atol=2e-3)


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac"])
def test_each_format_decodes_to_the_requested_duration(engine, fmt):
    result = engine.generate(req(audio_format=fmt, audio_duration=12.5, inference_steps=2, seeds=[1]))
    audio, sr = decode(result.audios[0].data)
    assert result.audios[0].format == fmt
    assert sr == 48000 and audio.shape[1] == 2
    assert abs(audio.shape[0] - 12.5 * 48000) <= HOP, audio.shape
    assert result.audios[0].duration_seconds == pytest.approx(12.5)


def test_cover_uses_the_source_length_and_strength(engine, source_wav):
    seen = []
    full = engine.generate(req(task_type="cover", src_audio_key="k", audio_duration=None, seeds=[3],
                               audio_cover_strength=1.0), src_audio=source_wav, progress=lambda f, s: seen.append((f, s)))
    audio, _ = decode(full.audios[0].data)
    assert abs(audio.shape[0] - 12 * 48000) <= HOP
    # the source's VAE encode (minutes for a long source on CPU) reports from inside too, before the first step
    encode = [f for f, s in seen if s == "VAE encode (source audio)"]
    assert len(encode) == 20 and encode == sorted(encode) and 0 < encode[0] and encode[-1] == pytest.approx(0.05)
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert full.generation_info["instruction"] == "Generate audio semantic tokens based on the given conditions:"
    blended = engine.generate(req(task_type="cover", src_audio_key="k", audio_duration=None, seeds=[3],
                                  audio_cover_strength=0.3), src_audio=source_wav)
    assert not np.allclose(samples(full), samples(blended), atol=1e-3)


def test_cover_source_changes_the_output(engine, source_wav):
    other = wav_bytes(12.0, freq=3000.0)
    a = engine.generate(req(task_type="cover", src_audio_key="k", audio_duration=None, seeds=[3]),
                        src_audio=source_wav)
    b = engine.generate(req(task_type="cover", src_audio_key="k", audio_duration=None, seeds=[3]), src_audio=other)
    assert not np.allclose(samples(a), samples(b), atol=1e-3)


def test_repaint_inside_and_outpainting_past_both_ends(engine, source_wav):
    inside = engine.generate(req(task_type="repaint", src_audio_key="k", repainting_start=2, repainting_end=5,
                                 audio_duration=None), src_audio=source_wav)
    assert abs(decode(inside.audios[0].data)[0].shape[0] - 12 * 48000) <= HOP
    assert inside.generation_info["instruction"].startswith("Repaint the mask area")
    out = engine.generate(req(task_type="repaint", src_audio_key="k", repainting_start=-3, repainting_end=15,
                              audio_duration=None), src_audio=source_wav)
    # 3 s added before and 3 s after the 12 s source
    assert abs(decode(out.audios[0].data)[0].shape[0] - 18 * 48000) <= HOP
    assert any("outpainting" in n for n in out.generation_info["notes"])
    to_end = engine.generate(req(task_type="repaint", src_audio_key="k", repainting_start=4, repainting_end=-1,
                                 audio_duration=None), src_audio=source_wav)
    assert abs(decode(to_end.audios[0].data)[0].shape[0] - 12 * 48000) <= HOP


@pytest.mark.parametrize("task,extra,instruction", [
    ("lego", {"track_name": "drums"}, "Generate the DRUMS track based on the audio context:"),
    ("extract", {"track_name": "vocals"}, "Extract the VOCALS track from the audio:"),
    ("complete", {"complete_track_classes": ["drums", "bass"]}, "Complete the input track with DRUMS | BASS:"),
])
def test_track_tasks_fill_their_instructions(engine, source_wav, task, extra, instruction):
    result = engine.generate(req(task_type=task, model=BASE, src_audio_key="k", audio_duration=None,
                                 guidance_scale=3.0, inference_steps=4, **extra), src_audio=source_wav)
    assert result.generation_info["instruction"] == instruction
    assert result.generation_info["task_type"] == task and result.dit_model == BASE
    assert abs(decode(result.audios[0].data)[0].shape[0] - 12 * 48000) <= HOP


def test_request_instruction_overrides(engine, source_wav):
    result = engine.generate(req(task_type="extract", model=BASE, src_audio_key="k", track_name="bass",
                                 instruction="Extract the BASS track, gently:", inference_steps=2),
                             src_audio=source_wav)
    assert result.generation_info["instruction"] == "Extract the BASS track, gently:"


def test_turbo_model_rejects_base_only_task_types(engine, source_wav):
    with pytest.raises(GenerationError, match=r"'lego' is not supported by model 'acestep-v15-turbo'"):
        engine.generate(req(task_type="lego", src_audio_key="k", track_name="drums"), src_audio=source_wav)


def test_unknown_model_is_a_clear_error(engine):
    with pytest.raises(GenerationError, match="unknown model 'acestep-v15-xl'"):
        engine.generate(req(model="acestep-v15-xl"))


def test_model_selection_uses_the_named_dit(engine):
    a = engine.generate(req(seeds=[5], inference_steps=2))
    b = engine.generate(req(seeds=[5], inference_steps=2, model=BASE, guidance_scale=1.0))
    assert (a.dit_model, b.dit_model) == (TURBO, BASE)
    assert not np.allclose(samples(a), samples(b), atol=1e-3)


def test_undecodable_source_is_a_clear_error(engine):
    with pytest.raises(GenerationError, match="could not decode src_audio"):
        engine.generate(req(task_type="cover", src_audio_key="k"), src_audio=b"this is not audio at all")


def test_too_long_source_is_a_clear_error(engine):
    long_wav = wav_bytes(601, sample_rate=8000, channels=1)
    with pytest.raises(GenerationError, match="src_audio is 601 s long; the limit is 600 s"):
        engine.generate(req(task_type="repaint", src_audio_key="k"), src_audio=long_wav)


def test_audio_codes_condition_the_output(engine):
    codes = "".join(f"<|audio_code_{(i * 7919) % 64000}|>" for i in range(50))  # 50 codes = 10 s at 5 Hz
    plain = engine.generate(req(seeds=[9]))
    coded = engine.generate(req(seeds=[9], audio_code_string=codes))
    assert coded.generation_info["pipeline_task_type"] == "cover"
    assert not np.allclose(samples(plain), samples(coded), atol=1e-3)
    no_duration = engine.generate(req(seeds=[9], audio_code_string=codes, audio_duration=None))
    assert abs(decode(no_duration.audios[0].data)[0].shape[0] - 10 * 48000) <= HOP


def test_reference_audio_conditions_the_output(engine):
    plain = engine.generate(req(seeds=[4]))
    ref = engine.generate(req(seeds=[4], reference_audio_key="r"), reference_audio=wav_bytes(5.0, freq=220.0))
    assert not np.allclose(samples(plain), samples(ref), atol=1e-3)


def test_sde_sampling_is_deterministic_per_seed_and_differs_from_ode(engine):
    a = engine.generate(req(seeds=[21], infer_method="sde"))
    b = engine.generate(req(seeds=[21], infer_method="sde"))
    ode = engine.generate(req(seeds=[21]))
    assert a.audios[0].data == b.audios[0].data
    assert not np.allclose(samples(a), samples(ode), atol=1e-3)
    assert engine.model(TURBO).pipe.scheduler.config.stochastic_sampling is False  # restored after the call


def test_custom_timesteps_set_the_step_count(engine):
    steps = []
    engine.generate(req(timesteps=[1.0, 0.6, 0.3]), progress=lambda f, s: steps.append(s))
    assert [s for s in steps if s.startswith("diffusion")] == [f"diffusion step {i}/3" for i in (1, 2, 3)]


def test_notes_for_ignored_fields(engine):
    info = engine.generate(req(use_adg=True, thinking=True, guidance_scale=7.0, inference_steps=2)).generation_info
    notes = " ".join(info["notes"])
    assert "use_adg ignored" in notes and "no 5 Hz LM" in notes and "guidance-distilled" in notes
    assert info["guidance_scale"] == 1.0


def test_progress_is_reported_in_order(engine):
    seen = []
    engine.generate(req(inference_steps=4), progress=lambda f, s: seen.append((f, s)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert sum(1 for _, s in seen if s.startswith("diffusion step")) == 4
    # after the last step the stages name what runs: the VAE decode (the longest on CPU), then encoding
    stages = [s for i, (_, s) in enumerate(seen) if not s.startswith("diffusion step") and s != seen[i - 1][1]]
    assert stages == ["preparing", "VAE decode", "encoding audio", "done"], stages
    assert seen[seen.index((0.8, "VAE decode")) - 1][1] == "diffusion step 4/4"


def test_the_vae_decode_reports_progress_from_inside(engine, monkeypatch):
    """One decode call of a long song on CPU outlasts the stall timeout unless it reports as it goes (issue 25):
    every decoder block's units report, untiled and through every tile of a tiled decode."""
    for tiled in (False, True):
        seen = []
        if tiled:  # a machine with almost nothing free: the engine tiles the decode (in short tiles here)
            monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
            vae = engine.model(None).pipe.vae
            monkeypatch.setattr(vae, "tile_latent_min_length", 128)
            monkeypatch.setattr(vae, "tile_latent_overlap", 16)
        result = engine.generate(req(inference_steps=2), progress=lambda f, s: seen.append((f, s)))
        assert result.generation_info["vae_decode"] == ("tiled" if tiled else "untiled")
        decode = [f for f, s in seen if s == "VAE decode"]
        assert decode == sorted(decode) and decode[0] == 0.8 and decode[-1] == pytest.approx(0.95), decode
        # 5 blocks x 4 units per decoder pass; 250 latent frames in tiles of 128 overlapping by 16: 3 passes
        assert len(decode) == 1 + 20 * (3 if tiled else 1), (tiled, len(decode))
        assert len(set(decode)) == len(decode)  # each report moves on


def test_a_cancel_during_the_vae_decode_stops_it(engine):
    seen = []

    def cancel_mid_decode(fraction, stage):
        seen.append(stage)
        if stage == "VAE decode" and fraction > 0.85:
            raise GenerationCancelled("task cancelled")

    with pytest.raises(GenerationCancelled):
        engine.generate(req(inference_steps=2), progress=cancel_mid_decode)
    assert seen[-1] == "VAE decode" and "encoding audio" not in seen


def test_encoding_a_batch_reports_its_own_progress(engine):
    seen = []
    engine.generate_batch([(req(inference_steps=2), {}), (req(inference_steps=2), {})],
                          progress=lambda f, s: seen.append((round(f, 3), s)))
    assert [f for f, s in seen if s == "encoding audio"] == [0.95, 0.975]


def test_cancellation_from_the_progress_callback_stops_generation(engine):
    steps = []

    def cancel_at_step_2(fraction, stage):
        steps.append(stage)
        if stage == "diffusion step 2/8":
            raise GenerationCancelled("worker shutting down")

    with pytest.raises(GenerationCancelled):
        engine.generate(req(), progress=cancel_at_step_2)
    assert steps[-1] == "diffusion step 2/8"
    assert "encoding audio" not in steps
    engine.generate(req(inference_steps=2))  # the engine is still usable


def test_generate_batch_runs_compatible_requests_in_one_call(engine):
    items = [(req(prompt="a", seeds=[1], batch_size=2), {}), (req(prompt="b", seeds=[2], batch_size=1,
                                                                  audio_format="flac"), {})]
    out = engine.generate_batch(items)
    assert [type(o).__name__ for o in out] == ["GenerationResult"] * 2
    assert out[0].generation_info["batched_requests"] == 2 and out[1].generation_info["batched_requests"] == 2
    assert [a.seed for a in out[0].audios] == [1, 2] and [a.seed for a in out[1].audios] == [2]
    assert out[1].audios[0].format == "flac"
    # batching does not change what a seed makes
    alone = engine.generate(req(prompt="b", seeds=[2]))
    np.testing.assert_allclose(decode(out[1].audios[0].data)[0], samples(alone), atol=2e-3)


def test_generate_batch_refuses_requests_that_cannot_share_a_call(engine, source_wav):
    with pytest.raises(ValueError, match="cannot share"):
        engine.generate_batch([(req(prompt="a"), {}), (req(prompt="c", audio_duration=11), {})])
    with pytest.raises(ValueError, match="cannot share"):
        engine.generate_batch([(req(task_type="cover", src_audio_key="k"), {"src_audio": source_wav}),
                               (req(task_type="cover", src_audio_key="k"), {"src_audio": source_wav})])
    # a single request is its own batch, and its failure is returned, not raised
    out = engine.generate_batch([(req(task_type="cover", src_audio_key="k"), {"src_audio": b"junk"})])
    assert isinstance(out[0], GenerationError)


def test_generate_batch_propagates_cancellation(engine):
    def cancel(fraction, stage):
        raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        engine.generate_batch([(req(), {}), (req(), {})], progress=cancel)


def test_outpainting_cannot_grow_past_the_600_s_limit(engine, source_wav):
    with pytest.raises(GenerationError, match="the limit is 600"):
        engine.generate(req(task_type="repaint", src_audio_key="k", audio_duration=None,
                            repainting_start=-595, repainting_end=5), src_audio=source_wav)


class _NaNPipe:
    """The real pipeline, but its first item comes back with a NaN (as fp16 overflow on a GPU does)."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        out = self._pipe(**kwargs)
        out.audios[0, 0, 5] = float("nan")
        return out


def test_nan_from_the_model_fails_that_request_only_and_never_reaches_the_encoder(engine, monkeypatch):
    model = engine.model(TURBO)
    monkeypatch.setattr(model, "pipe", _NaNPipe(model.pipe))
    with pytest.raises(GenerationError, match="NaN or infinite"):
        engine.generate(req(seeds=[1], audio_format="mp3"))  # libsndfile's mp3 encoder would abort on NaN
    first, second = engine.generate_batch([(req(seeds=[1], prompt="a"), {}), (req(seeds=[2], prompt="b"), {})])
    assert isinstance(first, GenerationError) and "NaN" in str(first)
    assert len(second.audios) == 1 and np.isfinite(samples(second)).all()


def test_text2music_does_not_even_decode_a_source_it_ignores(engine):
    result = engine.generate(req(seeds=[3]), src_audio=b"not audio at all")
    assert any("src_audio ignored" in n for n in result.generation_info["notes"])


def test_unencoded_audio_encodes_to_the_same_file(engine):
    """encode=False (the worker's pipeline encodes in other processes) gives the same file once encoded."""
    from engine.audio_encode import encode_pending

    deferred = engine.generate(req(seeds=[7], batch_size=2), encode=False)
    assert deferred.audios == [] and [p.seed for p in deferred.pending] == [7, 8]
    assert deferred.pending[0].samples.shape[0] == 2 and deferred.generation_info["timings"]["audio_encoding_s"] == 0
    direct = engine.generate(req(seeds=[7], batch_size=2))
    assert [encode_pending(p)[0].data for p in deferred.pending] == [a.data for a in direct.audios]
