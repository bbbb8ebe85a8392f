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


def test_format_input_goes_through_a_worker_with_the_lm(server):
    r = httpx.post(server.base_url + "/format_input", timeout=60, json={
        "prompt": "pop rock", "lyrics": "[verse] walking down the street",
        "param_obj": json.dumps({"duration": 30, "language": "en"})})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert set(data) == {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"}
    assert data["duration"] == 30 and 30 <= data["bpm"] <= 300 and data["caption"]


def test_format_input_times_out_with_a_clear_504(settings):
    from service.records import MODELS_META_KEY, ModelsMeta

    api = make_api(settings, format_timeout=0.5)
    api.backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="acestep-5Hz-lm-1.7B").model_dump())
    r = api.client.post("/format_input", json={"prompt": "x"})  # a worker said it has the LM, none runs now
    assert r.status_code == 504 and "ACESTEP_FORMAT_TIMEOUT" in r.json()["detail"]
