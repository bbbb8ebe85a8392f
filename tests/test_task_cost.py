"""The cost ceiling counts what runs (issue 21, item 4): the seconds the DiT generates as the engine decides
them (engine.plan: a repaint spans its padded source, audio codes set the length) and the 5 Hz LM's decode
steps; the API refuses over the ceiling at submit, and the worker refuses again before running."""
from __future__ import annotations

import pytest

from engine import plan
from engine.request import GenerationRequest, format_audio_codes
from service.records import FAILED, SUCCEEDED
from service.submission import Upload, submit_task
from service.task_limits import LM_STEP_COST, task_cost
from service.worker import Worker
from tests.api_support import make_api
from tests.support_engine import SineEngine

SOURCE = {"src_audio": ("one-second.wav", b"RIFF" + b"\0" * 64, "audio/wav")}  # never decoded by the API
CODES_3000 = format_audio_codes([7] * 3000)


def test_the_engines_length_decisions_are_the_ones_counted():
    repaint = GenerationRequest(task_type="repaint", src_audio_key="k", repainting_end=599, audio_duration=10)
    fit = plan.fit_source(repaint, 1.0)  # what engine.service._plan_source pads the source with
    assert fit.seconds == 599 and fit.pad_after == 598 and fit.repaint == (0.0, 599)
    assert plan.generated_seconds(repaint, 1.0) == 599
    assert plan.generated_seconds(repaint) == plan.MAX_OUTPUT_SECONDS  # source length not known yet
    cover = GenerationRequest(task_type="cover", src_audio_key="k", audio_duration=30)
    assert plan.generated_seconds(cover) == 30 and plan.generated_seconds(cover, 12.0) == 12
    codes = GenerationRequest(audio_code_string=CODES_3000)
    assert plan.text2music_seconds(codes) is None  # the pipeline takes the codes' length...
    assert plan.generated_seconds(codes) == 600  # ...600 s of them
    cut = GenerationRequest(audio_code_string=CODES_3000, audio_duration=10)
    assert plan.generated_seconds(cut) == 600  # all 3,000 codes are generated, then cut to 10 s


def test_the_lm_budget_follows_its_phases():
    cot = plan.LM_MAX_COT_TOKENS
    understand = plan.LM_MAX_COT_TOKENS + plan.LM_MAX_LYRICS_TOKENS + 2
    assert plan.lm_decode_steps(GenerationRequest(thinking=True, audio_duration=10, batch_size=4)) == cot + 51
    assert plan.lm_decode_steps(GenerationRequest(thinking=True, audio_duration=10, batch_size=4,
                                                  allow_lm_batch=False)) == cot + 4 * 51
    assert plan.lm_decode_steps(GenerationRequest(sample_query="rain", thinking=True)) == understand + 3001
    assert plan.lm_decode_steps(GenerationRequest(use_format=True, analysis_only=True)) == understand + cot
    every_meta = GenerationRequest(thinking=True, audio_duration=10, bpm=90, key_scale="C major", time_signature="4")
    assert plan.lm_decode_steps(every_meta) == 51  # phase 1 is skipped
    assert task_cost(GenerationRequest(thinking=True, audio_duration=10), lm=False).lm == 0
    # the LM may choose the length when none is given: counted at its longest
    assert task_cost(GenerationRequest(thinking=True, batch_size=1, inference_steps=8)).seconds == 600


@pytest.mark.parametrize("case", ["repaint_past_a_short_source", "codes_without_duration", "lm_thinking"])
def test_each_bypass_is_refused_at_submit(settings, case):
    """Each was admitted when the cost was audio_duration (or 30 s) x items x steps, 80-240 here."""
    api = make_api(settings, max_task_cost=1000)
    common = {"batch_size": 1, "inference_steps": 8}
    if case == "repaint_past_a_short_source":  # made 599 s of audio, counted as 10 s
        r = api.client.post("/release_task", data={"task_type": "repaint", "repainting_end": "599",
                                                   "audio_duration": "10", **common}, files=SOURCE)
    elif case == "codes_without_duration":  # made 600 s, counted as 30 s
        r = api.client.post("/release_task", json={"audio_code_string": CODES_3000, **common})
    else:  # 10 s of DiT, and the LM's phase 1 and codes: (1,024 + 51) decode steps
        r = api.client.post("/release_task", json={"prompt": "p", "thinking": True, "audio_duration": 10, **common})
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "ACESTEP_MAX_TASK_COST" in detail
    expected = {"repaint_past_a_short_source": "4,800 audio-second steps: 600 s generated",
                "codes_without_duration": "4,800 audio-second steps: 600 s generated",
                "lm_thinking": f"{80 + 1075 * LM_STEP_COST:,.0f} audio-second steps: 10 s generated"}[case]
    assert expected in detail, detail
    assert api.backend.queue.size() == 0


def test_work_under_the_ceiling_is_still_admitted(settings):
    api = make_api(settings, max_task_cost=1000)
    ok = [{"task_type": "cover", "audio_duration": "30"},  # a cover is cut to audio_duration: 30 x 8
          {"task_type": "repaint", "repainting_end": "20"}]  # 600 s at most, 1 step
    for fields in (ok[0] | {"batch_size": "1", "inference_steps": "8"}, ok[1] | {"batch_size": "1",
                                                                                "inference_steps": "1"}):
        r = api.client.post("/release_task", data=fields, files=SOURCE)
        assert r.status_code == 200, r.text
    assert api.client.post("/release_task", json={"audio_code_string": format_audio_codes([7] * 100),
                                                  "batch_size": 1, "inference_steps": 8}).status_code == 200


@pytest.mark.parametrize("lm_loaded", [False, True])
def test_the_worker_refuses_a_task_over_the_ceiling_before_running_it(settings, backend, lm_loaded):
    """A task queued under a higher ceiling (or written past the API) fails with the reason, on both backends."""
    engine = SineEngine()
    engine.lm_loaded = lm_loaded
    over = GenerationRequest(task_type="repaint", src_audio_key="placeholder", repainting_end=599,
                             audio_duration=10, batch_size=1, inference_steps=8)
    thinking = GenerationRequest(prompt="p", thinking=True, audio_duration=10, batch_size=1, inference_steps=8)
    ids = [submit_task(backend, over, 10, uploads={"src_audio": Upload(b"RIFF", "a.wav")})[0],
           submit_task(backend, thinking, 10)[0]]
    worker = Worker(settings.model_copy(update={"max_task_cost": 1000}), backend, engine)  # a lower ceiling now
    while worker.run_once(0.01):
        pass
    repaint, lm = (backend.store.get(i) for i in ids)
    assert repaint.status == FAILED and repaint.error.startswith("refused before running: this task would cost 4,800")
    assert "ACESTEP_MAX_TASK_COST" in repaint.error
    if lm_loaded:  # its LM would run: 80 + 1,075 decode steps x 5
        assert lm.status == FAILED and "5 Hz LM's 1,075 decode steps" in lm.error
    else:  # no LM here: 80 audio-second steps of DiT only
        assert lm.status == SUCCEEDED
    assert [c["request"].task_type for c in engine.calls] == ([] if lm_loaded else ["text2music"])
