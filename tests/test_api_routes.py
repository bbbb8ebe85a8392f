"""/health, /v1/models, /v1/stats, /create_random_sample, /format_input, the upload flow, docs."""
from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from handlers.app import create_app
from service.version import __version__
from tests.api_support import make_api

TS = {"3", "4", "6"}


@pytest.fixture
def api(settings):
    return make_api(settings, config_path2="acestep-v15-base")


def test_envelope(api):
    body = api.client.get("/health").json()
    assert set(body) == {"data", "code", "error", "timestamp", "extra"}
    assert body["code"] == 200 and body["error"] is None and body["extra"] is None
    assert isinstance(body["timestamp"], int) and len(str(body["timestamp"])) == 13
    assert abs(body["timestamp"] / 1000 - time.time()) < 60


def test_health_before_and_after_worker(api):
    data = api.client.get("/health").json()["data"]
    assert {k: data[k] for k in ("status", "service", "version")} == \
        {"status": "ok", "service": "ACE-Step API", "version": __version__}  # the package's (service/version.py)
    assert data["backend"] == "embedded" and data["demo"] == "unknown"  # no worker has said yet
    assert [m["random_weights"] for m in data["models"]] == [None, None]
    api.worker.publish_models()
    data = api.client.get("/health").json()["data"]
    assert data["demo"] is True and all(m["random_weights"] is True for m in data["models"])


def test_health_has_upstreams_model_keys(api):
    """Upstream's newer /health: models_initialized, llm_initialized, loaded_model, loaded_lm_model."""
    keys = ("models_initialized", "llm_initialized", "loaded_model", "loaded_lm_model")
    data = api.client.get("/health").json()["data"]
    assert [data[k] for k in keys] == [False, False, "acestep-v15-turbo", None]  # no worker alive yet
    api.worker.publish_models()
    api.backend.store.record_heartbeat(api.worker.heartbeat())
    data = api.client.get("/health").json()["data"]
    assert [data[k] for k in keys] == [True, False, "acestep-v15-turbo", None]  # the sine engine has no LM


def test_models(api):
    data = api.client.get("/v1/models").json()["data"]
    assert data["default_model"] == "acestep-v15-turbo"
    assert data["models"] == [
        {"name": "acestep-v15-turbo", "is_default": True, "random_weights": None, "is_loaded": False,
         "supported_task_types": ["text2music", "cover", "repaint", "lego", "extract", "complete"]},
        {"name": "acestep-v15-base", "is_default": False, "random_weights": None, "is_loaded": False,
         "supported_task_types": ["text2music", "cover", "repaint", "lego", "extract", "complete"]},
    ]  # no worker has reported yet: nothing loaded; the task types are each model's published ones
    api.worker.publish_models()
    data = api.client.get("/v1/models").json()["data"]
    assert data["models"][0]["random_weights"] is True and "text2music" in data["models"][0]["task_types"]
    assert data["lm_model"] == "none"
    # model selection by any alias reaches the engine
    task_id = api.submit(ditModel="acestep-v15-base", batch_size=1, duration=10)
    api.run_worker()
    assert api.items(task_id)[0]["dit_model"] == "acestep-v15-base"


def test_stats(api):
    stats = api.client.get("/v1/stats").json()["data"]
    assert stats == {"version": __version__, "jobs": {"total": 0, "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0},
                     "queue_size": 0, "queue_maxsize": 200, "avg_job_seconds": 5.0,
                     "recent": {"window_tasks": 0, "queue_wait_seconds": {}, "run_seconds": {},
                                "stage_seconds_mean": {}, "failures_by_reason": {}}}
    api.submit(prompt="a", batch_size=1, duration=10)
    api.submit(prompt="PLEASE FAIL", batch_size=1, duration=10)
    api.run_worker()
    api.submit(prompt="c")
    stats = api.client.get("/v1/stats").json()["data"]
    assert stats["jobs"] == {"total": 3, "queued": 1, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert stats["queue_size"] == 1 and isinstance(stats["avg_job_seconds"], float)
    assert stats["avg_job_seconds"] != 5.0


def test_random_sample_shapes(api):
    for body in (None, {}, {"sample_type": "simple_mode"}):
        kwargs = {} if body is None else {"json": body}
        data = api.client.post("/create_random_sample", **kwargs).json()["data"]
        assert set(data) == {"description", "instrumental", "vocal_language"}
    for sample_type in ("custom_mode", "text2music", "typo"):
        data = api.client.post("/create_random_sample", json={"sample_type": sample_type}).json()["data"]
        assert set(data) == {"think", "caption", "lyrics", "bpm", "duration", "keyscale", "language",
                             "timesignature"}
    form = api.client.post("/create_random_sample", data={"sample_type": "custom_mode"}).json()["data"]
    assert "caption" in form
    assert api.client.post("/create_random_sample", json={"sample_type": 3}).status_code == 400


def test_example_files_are_varied_and_valid():
    from handlers.routes_lm import examples

    simple, full = examples("simple_mode"), examples("text2music")
    assert len(simple) >= 16 and len(full) >= 16
    assert len({e["vocal_language"] for e in simple}) >= 5 and any(e["instrumental"] for e in simple)
    assert len({e["language"] for e in full}) >= 5
    assert all(40 <= e["bpm"] <= 200 and 30 <= e["duration"] <= 240 for e in full)
    assert {e["timesignature"] for e in full} == TS and all(isinstance(e["timesignature"], str) for e in full)


def test_format_input_without_lm_is_503(api):
    r = api.client.post("/format_input", json={"prompt": "pop rock", "lyrics": "Walking down the street",
                                               "param_obj": "{\"duration\": 180, \"language\": \"en\"}"})
    assert r.status_code == 503 and "5Hz LM is not loaded" in r.json()["detail"]


@pytest.mark.parametrize("body,field", [
    ({"param_obj": "{bad"}, "param_obj"),
    ({"param_obj": {"duration": 5}}, "param_obj.duration"),
    ({"param_obj": {"bpm": 999}}, "param_obj.bpm"),
    ({"param_obj": {"bpm": "fast"}}, "param_obj.bpm"),
    ({"temperature": 9}, "temperature"),
    ({"time_signature": "7"}, "time_signature"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"param_obj": {"key": "k" * 100}}, "param_obj.key (key_scale)"),  # the name as sent, then the canonical one
])
def test_format_input_validates_before_the_lm(api, body, field):
    r = api.client.post("/format_input", json=body)
    assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text


class FakeLM:
    def __init__(self):
        self.calls = []

    def format_sample(self, *, caption, lyrics, metadata, temperature):
        self.calls.append((caption, lyrics, metadata, temperature))
        return {"caption": caption.upper(), "bpm": 120, "key_scale": "C major"}


def test_format_input_through_the_apps_lm_gateway(api):
    fake = FakeLM()
    client = TestClient(create_app(api.settings, api.backend, lm_gateway=fake))
    r = client.post("/format_input", json={"prompt": "pop rock", "lyrics": "la",
                                           "param_obj": "{\"duration\": 60, \"language\": \"en\"}"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert set(data) == {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"}
    assert data["caption"] == "POP ROCK" and data["duration"] == 60 and data["vocal_language"] == "en"
    assert fake.calls[0][2] == {"duration": 60.0, "language": "en"}


class FakeSampleLM(FakeLM):
    def create_sample(self, *, query, instrumental, vocal_language, temperature):
        self.calls.append((query, instrumental, vocal_language, temperature))
        return {"caption": f"a song about {query}", "lyrics": "[Instrumental]", "bpm": 96, "key_scale": "A minor",
                "time_signature": "4", "duration": 42.0}


def test_create_sample_through_the_apps_lm_gateway(api):
    """Upstream's POST /v1/create_sample: its answer's keys, its defaults (vocal_language "unknown")."""
    fake = FakeSampleLM()
    client = TestClient(create_app(api.settings, api.backend, lm_gateway=fake))
    r = client.post("/v1/create_sample", json={"query": "rain", "instrumental": "true", "temperature": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"caption": "a song about rain", "lyrics": "[Instrumental]", "bpm": 96,
                                "keyscale": "A minor", "duration": 42.0, "timesignature": "4",
                                "vocal_language": "unknown"}
    assert fake.calls == [("rain", True, "unknown", 0.5)]
    r = client.post("/v1/create_sample", json={"query": "x", "temperature": 9})
    assert r.status_code == 400 and r.json()["detail"].startswith("temperature (lm_temperature): must be between")


def test_create_sample_runs_as_a_sample_mode_task_on_a_worker(settings):
    from service.records import CANCELLED, MODELS_META_KEY, ModelsMeta

    api = make_api(settings, format_timeout=0.3)
    assert api.client.post("/v1/create_sample", json={"query": "x"}).status_code == 503  # no worker runs the LM
    api.backend.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model="acestep-5Hz-lm-1.7B").model_dump())
    r = api.client.post("/v1/create_sample", data={"query": "calm piano", "instrumental": "yes",
                                                     "vocal_language": "ja"})  # a form, as upstream reads too
    detail = r.json()["detail"]
    assert r.status_code == 504 and "create_sample timed out" in detail  # nobody ran it
    record = api.backend.store.get(re.search(r"task (\S+) was cancelled", detail).group(1))
    assert record.status == CANCELLED
    assert {k: record.request.model_dump()[k] for k in ("sample_mode", "sample_query", "analysis_only",
                                                         "batch_size", "vocal_language", "audio_duration")} == \
        {"sample_mode": True, "sample_query": "calm piano (instrumental)", "analysis_only": True, "batch_size": 1,
         "vocal_language": "ja", "audio_duration": None}


def test_upload_flow(api):
    r = api.client.post("/v1/uploads", json={"filename": "../../My Song (1).wav", "content_type": "audio/wav",
                                             "role": "src_audio"})
    assert r.status_code == 200, r.text
    up = r.json()["data"]
    assert up["method"] == "PUT" and up["key"].startswith("uploads/pending/") and up["key"].endswith("/My_Song_1_.wav")
    assert up["upload_url"].startswith("/v1/uploads/uploads/pending/") and up["expires_in"] > 0
    put = api.client.put(up["upload_url"], content=b"RIFFsource", headers={"Content-Type": "audio/wav"})
    assert put.status_code == 200 and put.json()["data"]["size"] == 10
    task_id = api.submit(task_type="cover", src_audio_key=up["key"], batch_size=1, duration=10)
    assert api.backend.store.get(task_id).blob_keys == [f"uploads/{task_id}/src_audio.wav"]  # its own copy
    api.run_worker()
    assert api.query(task_id)[0]["status"] == 1
    assert api.engine.calls[-1]["src_audio"] == b"RIFFsource"


def test_unused_direct_uploads_count_against_their_callers_quota_and_expire(settings):
    """Issue 21.10: six 45 MB PUTs filled a 300 MB disk and every submit answered 507 for a day. A caller's
    unused uploads now hold at most 4 uploads' worth, and expire an hour after their upload."""
    import os
    import time

    from fastapi.testclient import TestClient

    api = make_api(settings, max_upload_mb=1, max_adapter_mb=1)  # the quota: 4 audio files and one adapter
    one_mb = b"x" * (1024 * 1024)

    def put(client) -> int:
        up = client.post("/v1/uploads", json={"filename": "a.wav"}).json()["data"]
        return client.put(up["upload_url"], content=one_mb).status_code

    assert [put(api.client) for _ in range(5)] == [200] * 5
    adapter = api.client.post("/v1/adapters/uploads", json={"filename": "a.safetensors"}).json()["data"]
    assert api.client.put(adapter["upload_url"], content=one_mb).status_code == 429  # the same quota
    assert put(api.client) == 429
    other = TestClient(api.client.app, client=("192.0.2.7", 4000))
    assert put(other) == 200  # another caller's quota is its own
    for key in api.backend.blobs.keys_older_than("uploads/pending/", float("inf")):  # written two hours ago
        os.utime(api.backend.blobs.local_path(key), (time.time() - 7200,) * 2)
    assert api.backend.sweep_expired() == 6  # unused: expired
    assert put(api.client) == 200


def test_oversized_pre_uploaded_file_is_refused_at_submit(settings):
    # A presigned PUT cannot cap the size, so the submit checks what arrived.
    api = make_api(settings, max_upload_mb=1)
    up = api.client.post("/v1/uploads", json={"filename": "a.wav"}).json()["data"]
    api.backend.blobs.put(up["key"], b"x" * (1024 * 1024 + 1), "audio/wav")
    r = api.client.post("/release_task", json={"task_type": "cover", "src_audio_key": up["key"]})
    assert r.status_code == 413 and "1 MB" in r.json()["detail"]
    assert api.backend.store.counts()["total"] == 0


@pytest.mark.parametrize("body,status", [
    ({}, 400), ({"filename": ""}, 400), ({"filename": "a.wav", "content_type": "text/html"}, 415),
    ({"filename": "a.wav", "role": "boss"}, 400),
])
def test_upload_request_errors(api, body, status):
    assert api.client.post("/v1/uploads", json=body).status_code == status


def test_upload_put_limits(settings):
    api = make_api(settings, max_upload_mb=1)
    up = api.client.post("/v1/uploads", json={"filename": "a.wav"}).json()["data"]
    assert api.client.put(up["upload_url"], content=b"x" * (1024 * 1024 + 1)).status_code == 413
    assert api.client.put(up["upload_url"], content=b"").status_code == 400
    assert api.backend.blobs.size(up["key"]) is None


def test_docs_and_openapi_without_key(api):
    assert api.client.get("/docs").status_code == 200
    schema = api.client.get("/openapi.json").json()
    assert {"/release_task", "/query_result", "/v1/audio", "/v1/models", "/v1/stats", "/health",
            "/format_input", "/create_random_sample", "/v1/uploads"} <= set(schema["paths"])
    body = schema["paths"]["/release_task"]["post"]["requestBody"]["content"]
    assert "application/json" in body and "multipart/form-data" in body


def test_unknown_route_and_method(api):
    assert api.client.get("/nope").status_code == 404
    assert api.client.get("/release_task").status_code == 405


def test_handlers_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, handlers.app, handlers.routes_tasks, handlers.routes_audio, handlers.routes_lm, "
            "handlers.routes_info\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'soundfile') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_result_json_has_unicode(api):
    task_id = api.submit(prompt="한국어 발라드", batch_size=1, duration=10)
    api.run_worker()
    entry = api.query(task_id)[0]
    assert "한국어" in entry["result"] and json.loads(entry["result"])[0]["prompt"] == "한국어 발라드"


def test_cancel_route_and_its_upstream_style_alias(settings):
    from tests.api_support import make_api

    api = make_api(settings, api_key="sk-test")
    first, second = api.submit(prompt="a"), api.submit(prompt="b")
    assert api.client.post(f"/v1/tasks/{first}/cancel").status_code == 401  # auth as every route
    r = api.client.post(f"/v1/tasks/{first}/cancel", headers=api.headers())
    assert r.status_code == 200 and r.json()["data"] == {"task_id": first, "status": "cancelled",
                                                         "cancelled_now": True}
    again = api.client.post(f"/v1/tasks/{first}/cancel", headers=api.headers()).json()["data"]
    assert again["cancelled_now"] is False  # idempotent
    r = api.client.post("/cancel_task", json={"task_id": second, "ai_token": "sk-test"})
    assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
    entry = api.query(first)[0]
    assert entry["status"] == 2 and entry["error"] == "cancelled by the client"
    assert json.loads(entry["result"])[0]["stage"] == "cancelled"
    assert api.client.post("/v1/tasks/nope/cancel", headers=api.headers()).status_code == 404
    assert api.client.post("/cancel_task", json={}, headers=api.headers()).status_code == 400
    done = api.submit(prompt="c", batch_size=1)
    api.run_worker()
    r = api.client.post(f"/v1/tasks/{done}/cancel", headers=api.headers())
    assert r.status_code == 200 and r.json()["data"] == {"task_id": done, "status": "succeeded",
                                                         "cancelled_now": False}  # finished first: kept
    assert api.client.get("/v1/stats", headers=api.headers()).json()["data"]["jobs"]["cancelled"] == 2
