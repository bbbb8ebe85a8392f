"""The engine with the 5 Hz LM: the planner's metadata, caption and per-item codes reach the DiT, results
report what the LM chose, analysis_only returns the plan without audio. Tiny random models, labelled."""
from __future__ import annotations

import pytest
import torch

from engine.request import GenerationRequest, parse_audio_codes

LM = "tiny-5Hz-lm"


@pytest.fixture(scope="module")
def lm_engine(tmp_path_factory):
    from engine.weights.checkpoints import build_tiny_checkpoint
    from engine.config import EngineConfig
    from engine.lm.tiny import build_tiny_lm
    from engine.service import Engine

    root = tmp_path_factory.mktemp("ckpt")
    build_tiny_checkpoint(root / "acestep-v15-turbo", seed=0)
    build_tiny_lm(root / LM, seed=0, audio_codes=1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny LM decodes faster on one thread on this small machine
    try:
        yield Engine.load(EngineConfig(checkpoint_dir=str(root), model_names=["acestep-v15-turbo"],
                                       allow_download=False, lm_model=LM))
    finally:
        torch.set_num_threads(threads)


def req(**kw) -> GenerationRequest:
    base = dict(prompt="lofi piano", lyrics="[verse] la la", audio_duration=10, batch_size=2, seeds=[5, 6],
                audio_format="wav", inference_steps=2, thinking=True)
    return GenerationRequest(**{**base, **kw})


def test_thinking_plans_metadata_and_one_code_sequence_per_item(lm_engine):
    assert lm_engine.lm_loaded and lm_engine.describe()["lm_model"] == LM
    assert lm_engine.describe()["lm_dtype"] == lm_engine.describe()["dtype"]  # the LM follows ACESTEP_DTYPE
    seen: list[tuple[float, str]] = []
    result = lm_engine.generate(req(), progress=lambda f, stage: seen.append((f, stage)))
    info = result.generation_info
    # progress covers the LM's steps (the first half: it writes codes), then the DiT's
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    lm_stages = [(f, s) for f, s in seen if s.startswith("LM: ")]
    assert {s.split(":")[1] for _, s in lm_stages} == {" caption and metadata", " audio codes"}
    assert ("LM: audio codes: 51/51 tokens" in [s for _, s in lm_stages]) and max(f for f, _ in lm_stages) == 0.5
    assert all(f >= 0.5 for f, s in seen[len(lm_stages):]) and seen[len(lm_stages)][1] == "preparing"
    assert "the 5 Hz LM's audio codes: ran as cover (as upstream does)" in info["notes"]
    assert result.lm_model == LM and info["lm_random_weights"] is True and info["random_weights"] is True
    assert info["lm_dtype"] == info["dtype"]
    assert info["lm_codes_per_item"] == [50, 50]  # exactly duration x 5 for each item
    assert [a.seed for a in result.audios] == [5, 6] and len(result.audios) == 2
    assert info["pipeline_task_type"] == "cover"  # codes condition the DiT as upstream's handler does
    md = info["lm_metadata"]
    assert 30 <= result.metas.bpm <= 300 and result.metas.key_scale == md["keyscale"]
    assert {"lm_total_s", "dit_s"} <= set(info["timings"]) and info["lm_phases"]
    assert all(a.duration_seconds == pytest.approx(10.0) for a in result.audios)


def test_cover_with_thinking_says_the_lm_plans_no_cover(lm_engine):
    from engine.plan import lm_runs
    from engine.timing import StageClock

    codes = "".join(f"<|audio_code_{c}|>" for c in range(50))
    request = req(task_type="cover", audio_code_string=codes, batch_size=1, seeds=[1])
    assert not lm_runs(request, lm_loaded=True)
    # the notes of what generate() runs for it (a whole cover costs seconds of DiT on this machine)
    notes = lm_engine._generation_info(lm_engine._prepare(request, None, None), StageClock(cuda=False),
                                       0.0, 0.0, 1, 1)["notes"]
    assert "thinking ignored: the 5 Hz LM plans no cover task (as upstream)" in notes
    assert not any("no 5 Hz LM runs" in n or "ran as" in n for n in notes)  # a cover asked for, codes the client's


def test_user_metadata_is_kept_and_phase_1_skipped_when_complete(lm_engine):
    result = lm_engine.generate(req(bpm=97, key_scale="D minor", time_signature="3", batch_size=1, seeds=[1]))
    assert result.metas.bpm == 97 and result.metas.key_scale == "D minor"
    assert result.metas.time_signature in (3, "3")
    assert [p["phase"] for p in result.generation_info["lm_phases"]] == ["codes"]


def test_analysis_only_returns_the_plan_without_audio(lm_engine):
    result = lm_engine.generate(req(analysis_only=True, thinking=False, batch_size=1, seeds=[3]))
    assert result.audios == [] and result.lm_model == LM
    assert result.generation_info["analysis_only"] is True and 30 <= result.metas.bpm <= 300


def test_the_same_seed_plans_the_same_codes(lm_engine):
    from engine.lm_bridge import request_for_dit

    plans = [lm_engine.planner.plan(req(batch_size=1, seeds=[42]), seeds=[42]) for _ in range(2)]
    assert plans[0].codes == plans[1].codes
    dit_request = request_for_dit(req(batch_size=1, seeds=[42]), plans[0])
    assert parse_audio_codes(dit_request.audio_code_string) == plans[0].codes[0]


def _wav(seconds: float, seed: int = 0) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(int(48000 * seconds)) / 48000
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone, tone], axis=1).astype("float32"), 48000, format="WAV")
    return buf.getvalue()


def test_full_analysis_only_reads_the_source_through_codes(lm_engine):
    from engine import audio_io
    from engine.source_codes import audio_to_codes

    wav = _wav(4.0)
    request = req(full_analysis_only=True, thinking=False, batch_size=1, seeds=[9], task_type="text2music",
                  src_audio_key="uploads/x.wav")
    result = lm_engine.generate(request, src_audio=wav)
    info = result.generation_info
    assert result.audios == [] and result.lm_model == LM and info["full_analysis_only"] is True
    assert info["source_codes"] == 20  # one code per 0.2 s of source
    assert [p["phase"] for p in info["lm_phases"]] == ["understand"]
    assert result.metas.duration == pytest.approx(4.0)  # measured, not the LM's guess
    assert 30 <= info["lm_metadata"]["bpm"] <= 300 and info["lm_random_weights"] is True
    # The codes are the DiT's own tokenizer's and depend only on the audio.
    pipe = lm_engine.model(None).pipe
    audio = audio_io.decode_audio(wav)
    assert audio_to_codes(pipe, audio) == audio_to_codes(pipe, audio)
    assert audio_to_codes(pipe, audio) != audio_to_codes(pipe, audio_io.decode_audio(_wav(4.0, seed=3)))


def test_full_analysis_only_without_source_is_refused_at_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="full_analysis_only needs source audio"):
        GenerationRequest(prompt="x", full_analysis_only=True)


def test_allow_lm_batch_false_decodes_item_by_item_with_the_same_codes(lm_engine):
    batched = lm_engine.planner.plan(req(seeds=[5, 6]), seeds=[5, 6])
    one_by_one = lm_engine.planner.plan(req(seeds=[5, 6], allow_lm_batch=False), seeds=[5, 6])
    assert one_by_one.codes == batched.codes  # each item draws from its own seed either way
    assert [p.items for p in one_by_one.phases if p.phase == "codes"] == [1, 1]
    assert [p.items for p in batched.phases if p.phase == "codes"] == [2]
    assert one_by_one.timings["lm_codes_s"] == pytest.approx(
        sum(p.seconds for p in one_by_one.phases if p.phase == "codes"), abs=1e-3)


def test_the_random_weight_lm_renders_the_demo_length_when_no_duration_is_given(lm_engine):
    assert lm_engine.planner.demo_seconds == 30  # set because the tiny LM has random weights
    plan = lm_engine.planner.plan(req(audio_duration=None, batch_size=1, seeds=[3]), seeds=[3])
    assert plan.metadata["duration"] == 30 and [len(c) for c in plan.codes] == [150]
    assert any("demo length 30 s" in note for note in plan.notes)
    given = lm_engine.planner.plan(req(audio_duration=12, batch_size=1, seeds=[3]), seeds=[3])
    assert [len(c) for c in given.codes] == [60]  # the user's own duration always wins


def test_devices_say_where_each_part_runs(lm_engine):
    """The typed report the worker's heartbeat carries: on this CPU machine every part computes on the CPU."""
    from engine import device_probe

    report = lm_engine.devices()
    assert report.device == "cpu" and report.models == ("acestep-v15-turbo",) and report.lm_model == LM
    placement = report.placement
    assert (placement.dit, placement.vae, placement.text_encoder, placement.lm) == ("cpu",) * 4
    assert report.dtype == lm_engine.describe()["dtype"] and report.lm_dtype == lm_engine.describe()["lm_dtype"]
    assert report.quantization == {"dit": "none", "lm": "none"} and report.offload_active is False
    assert report.gpus == device_probe.visible_gpus() and report.host.cpu == device_probe.cpu_name()
