"""Requests that need the 5 Hz LM: refused at submit when the workers run none; through `make run`'s demo
DiT + demo LM, thinking and sample mode work end to end (labelled as random weights)."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.api_support import make_api
from tests.live_server import live_server


def test_lm_requests_are_refused_at_submit_when_no_worker_has_the_lm(settings):
    api = make_api(settings)
    assert api.client.post("/release_task", json={"sample_query": "a happy song"}).status_code == 200  # no worker yet
    api.worker.publish_models()  # the sine test engine loads no LM
    r = api.client.post("/release_task", json={"sample_query": "a happy song"})
    assert r.status_code == 400 and "ACESTEP_INIT_LLM=true" in r.json()["detail"]
    assert api.client.post("/release_task", json={"prompt": "plain", "thinking": True}).status_code == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-service")
    with live_server(str(root / "data"), str(root / "checkpoints"), env={"OMP_NUM_THREADS": "1"}) as s:
        s.wait_for_worker()
        yield s


def test_thinking_runs_the_lm_then_the_dit(server):
    models = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]
    assert models["lm_model"] == "acestep-5Hz-lm-1.7B"  # the demo LM built beside the demo DiT
    r = httpx.post(server.base_url + "/release_task", timeout=10, json={
        "prompt": "upbeat pop", "lyrics": "[verse] hello", "thinking": True, "audio_duration": 10,
        "batch_size": 1, "inference_steps": 2, "audio_format": "wav"})
    entry = server.wait_done(r.json()["data"]["task_id"], timeout=180)
    assert entry["status"] == 1, entry
    item = json.loads(entry["result"])[0]
    assert item["lm_model"] == "acestep-5Hz-lm-1.7B" and item["metas"]["bpm"] != "N/A"
    detail = item["generation_info_detail"]
    assert detail["lm_codes_per_item"] == [50] and detail["lm_random_weights"] is True
    assert "random weights" in item["generation_info"].lower()


def test_sample_mode_writes_the_song_from_a_description(server):
    r = httpx.post(server.base_url + "/release_task", timeout=10, json={
        "sample_mode": True, "sample_query": "a calm piano ballad", "batch_size": 1, "inference_steps": 2,
        "audio_format": "wav", "audio_duration": 10})
    entry = server.wait_done(r.json()["data"]["task_id"], timeout=180)
    assert entry["status"] == 1, entry
    item = json.loads(entry["result"])[0]
    assert item["lm_model"] == "acestep-5Hz-lm-1.7B" and item["file"]
    detail = item["generation_info_detail"]  # the song the LM wrote, as upstream's item shows it
    assert (item["prompt"], item["lyrics"]) == (detail["lm_caption"], detail["lm_lyrics"]) and item["prompt"]
    assert item["metas"]["prompt"] == "" and detail["request"]["sample_query"] == "a calm piano ballad"


def test_format_input_goes_through_a_worker_with_the_lm(server):
    r = httpx.post(server.base_url + "/format_input", timeout=60, json={
        "prompt": "pop rock", "lyrics": "[verse] walking down the street",
        "param_obj": json.dumps({"duration": 30, "language": "en"})})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert set(data) == {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"}
    assert data["duration"] == 30 and 30 <= data["bpm"] <= 300 and data["caption"]


def test_create_sample_goes_through_a_worker_with_the_lm(server):
    r = httpx.post(server.base_url + "/v1/create_sample", timeout=60, json={"query": "a calm piano ballad"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]  # upstream's keys; the random-weight LM's values, within its constrained ranges
    assert set(data) == {"caption", "lyrics", "bpm", "keyscale", "duration", "timesignature", "vocal_language"}
    assert data["caption"] and 30 <= data["bpm"] <= 300 and 10 <= data["duration"] <= 600


def test_format_input_times_out_with_a_clear_504(settings):
    from service.records import MODELS_META_KEY, ModelsMeta

    api = make_api(settings, format_timeout=0.5)
    api.backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="acestep-5Hz-lm-1.7B").model_dump())
    r = api.client.post("/format_input", json={"prompt": "x"})  # a worker said it has the LM, none runs now
    assert r.status_code == 504 and "ACESTEP_FORMAT_TIMEOUT" in r.json()["detail"]


def test_full_analysis_only_reads_an_uploaded_song(server):
    from tests.engine_fixtures import wav_bytes

    r = httpx.post(server.base_url + "/release_task", timeout=10,
                   data={"full_analysis_only": "true", "task_type": "text2music"},
                   files={"src_audio": ("song.wav", wav_bytes(3.0, freq=220.0), "audio/wav")})
    assert r.status_code == 200, r.text
    entry = server.wait_done(r.json()["data"]["task_id"], timeout=180)
    assert entry["status"] == 1, entry
    item = json.loads(entry["result"])[0]
    assert item["file"] == "" and item["lm_model"] == "acestep-5Hz-lm-1.7B"
    detail = item["generation_info_detail"]
    assert detail["full_analysis_only"] is True and detail["source_codes"] == 15
    assert item["metas"]["duration"] == 3.0 and item["prompt"] == detail["caption"]
    assert item["language"] == detail["lm_metadata"].get("language", "unknown")


def test_full_analysis_only_without_audio_is_a_clear_400(server):
    r = httpx.post(server.base_url + "/release_task", timeout=10, json={"full_analysis_only": True})
    assert r.status_code == 400 and "full_analysis_only needs source audio" in r.text


def _guide_curl_body(heading: str) -> dict:
    """The JSON body (`-d '...'`) of the first bash block under `heading` in the ACE-Step guide."""
    import re

    from tests.live_server import SEED_DOC

    if not SEED_DOC.is_file():
        pytest.skip(f"the ACE-Step guide is not at {SEED_DOC}")
    part = SEED_DOC.read_text(encoding="utf-8").split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", part, re.S).group(1)
    return json.loads(re.search(r"-d '(.*?)'", block, re.S).group(1))


def test_the_guides_thinking_example_runs_verbatim_with_the_lm(server):
    # The guide's other thinking example leaves the duration to the LM, and a random-weight LM picks anything
    # up to 600 s: too long for a test. This one fixes 30 s and a bpm.
    body = _guide_curl_body("#### Text2Music (기본)")
    assert body["thinking"] is True and body["duration"] == 30
    task_id = httpx.post(server.base_url + "/release_task", timeout=10, json=body).json()["data"]["task_id"]
    entry = server.wait_done(task_id, timeout=110)
    assert entry["status"] == 1, entry
    items = json.loads(entry["result"])
    item = items[0]
    # the LM planned 30 s of codes for each item of the default batch
    assert item["generation_info_detail"]["lm_codes_per_item"] == [150] * len(items)
    assert item["metas"]["bpm"] == 140 and item["audio_duration"] == pytest.approx(30, abs=0.1)  # forced
