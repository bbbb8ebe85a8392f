"""Values and habits upstream accepts: "auto" values, timesteps ending in 0, a result's file as the
source of a new task, upstream-only environment variables. (/health's "demo": "unknown" before any
worker reports: test_api_routes.)"""
from __future__ import annotations

import logging
import tempfile

import pytest

from service.upstream_env import warn_unused_upstream_env
from tests.api_support import make_api


@pytest.fixture
def api(settings):
    return make_api(settings)


@pytest.mark.parametrize("sent, stored", [
    ({"audio_duration": 0}, {"audio_duration": None}), ({"audio_duration": -1}, {"audio_duration": None}),
    ({"duration": "-1"}, {"audio_duration": None}), ({"bpm": 0}, {"bpm": None}), ({"bpm": "0"}, {"bpm": None}),
    ({"time_signature": "6/8"}, {"time_signature": "6"}), ({"time_signature": "3/4"}, {"time_signature": "3"}),
    ({"time_signature": "4/4"}, {"time_signature": "4"}), ({"time_signature": "2/4"}, {"time_signature": "2"}),
    ({"timesteps": "0.97,0.76,0.615,0.5,0.395,0.28,0.18,0.085,0"},
     {"timesteps": [0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085]}),
    ({"timesteps": [1.0, 0.5, 0]}, {"timesteps": [1.0, 0.5]}),
])
def test_upstream_auto_values_are_accepted(api, sent, stored):
    request = api.stored_request(api.submit(prompt="p", **sent))
    assert {k: request[k] for k in stored} == stored


@pytest.mark.parametrize("sent, message", [
    ({"audio_duration": 5}, "between 10 and 600"), ({"bpm": 10}, "between 30 and 300"),
    ({"bpm": -5}, "between 30 and 300"), ({"time_signature": "5/4"}, "must be one of 2, 3, 4, 6"),
    ({"timesteps": "0.5,0"}, None), ({"timesteps": "0"}, "(0, 1]"),
])
def test_values_outside_upstream_auto_still_refused(api, sent, message):
    if message is None:  # a single real step before the final 0 is fine
        api.submit(prompt="p", **sent)
        return
    r = api.client.post("/release_task", json={"prompt": "p", **sent})
    assert r.status_code == 400 and message in r.json()["detail"], r.text


def test_a_finished_tasks_file_is_the_source_of_a_cover(api):
    first = api.submit(prompt="p", batch_size=1, audio_duration=10)
    api.run_worker()
    item = api.items(first)[0]
    stored = api.backend.store.get(first).result.audios[0]
    data = api.backend.blobs.get(stored.key)
    for reference in (item["file"], "http://example.test" + item["file"], stored.key):
        cover = api.submit(task_type="cover", prompt="jazz", src_audio_path=reference,
                           reference_audio_path=reference, batch_size=1)
        request = api.stored_request(cover)
        # copied into the new task's own uploads: each task expires on its own
        assert request["src_audio_key"].startswith(f"uploads/{cover}/")
        assert api.backend.blobs.get(request["src_audio_key"]) == data
        assert api.backend.blobs.get(request["reference_audio_key"]) == data
    api.run_worker()
    assert api.query(cover)[0]["status"] == 1


def test_an_unknown_or_unfinished_tasks_file_is_refused(api):
    queued = api.submit(prompt="p", batch_size=1)
    for key in (f"outputs/{queued}/1-0.mp3", "outputs/nosuchtask/1-0.mp3", "/v1/audio?path=outputs%2Fx%2F1-0.mp3"):
        r = api.client.post("/release_task", json={"task_type": "cover", "src_audio_path": key})
        assert r.status_code == 400 and "no finished task has the file" in r.json()["detail"], r.text
    # anything else is still a server path, refused outside ACESTEP_ALLOWED_AUDIO_DIRS
    r = api.client.post("/release_task", json={"task_type": "cover", "src_audio_path": "/v1/audio/../etc"})
    assert r.status_code == 400 and "server file paths are not accepted" in r.json()["detail"]


def test_upstream_only_env_vars_are_named_once_and_tmpdir_is_honoured(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    env = {"ACESTEP_OFFLOAD_TO_CPU": "true", "ACESTEP_USE_FLASH_ATTENTION": "true", "ACESTEP_API_WORKERS": "2",
           "ACESTEP_TMPDIR": str(tmp_path / "tmp"), "ACESTEP_GENERATION_TIMEOUT": "600"}
    with caplog.at_level(logging.WARNING, logger="service.upstream_env"):
        names = warn_unused_upstream_env(env)
    assert names == ["ACESTEP_OFFLOAD_TO_CPU", "ACESTEP_USE_FLASH_ATTENTION", "ACESTEP_API_WORKERS"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ACESTEP_API_WORKERS" in warnings[0] and "GENERATION_TIMEOUT" not in warnings[0]
    assert tempfile.gettempdir() == str(tmp_path / "tmp")
    assert warn_unused_upstream_env({}) == []

