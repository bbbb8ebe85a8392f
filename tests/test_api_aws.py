"""The API on the AWS backend (moto): submit, upload flow with presigned PUT, results, 307 downloads."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from handlers.app import create_app
from service.worker import Worker
from tests.support_engine import SineEngine


@pytest.fixture
def aws_api(settings, tmp_path):
    pytest.importorskip("moto")
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings) as backend:
        s = backend.settings
        yield s, backend, TestClient(create_app(s, backend))


def _run(settings, backend):
    worker = Worker(settings, backend, SineEngine(settings.model_names), worker_id="w")
    while worker.run_once(0.01):
        pass
    return worker


def test_release_query_download_on_aws(aws_api):
    settings, backend, client = aws_api
    r = client.post("/release_task", json={"caption": "lofi", "seed": "5,6", "batch_size": 2, "duration": 10,
                                           "audio_format": "flac"})
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["task_id"]
    assert r.json()["data"]["queue_position"] == 1
    _run(settings, backend)
    entry = client.post("/query_result", json={"task_id_list": [task_id]}).json()["data"][0]
    assert entry["status"] == 1
    items = json.loads(entry["result"])
    assert [i["seed"] for i in items] == [5, 6] and items[0]["seed_value"] == "5,6"
    r = client.get(items[0]["file"], follow_redirects=False)
    assert r.status_code == 307 and settings.bucket in r.headers["location"]
    assert "outputs" in r.headers["location"]


def test_upload_flow_on_aws(aws_api):
    settings, backend, client = aws_api
    up = client.post("/v1/uploads", json={"filename": "src.wav", "content_type": "audio/wav"}).json()["data"]
    assert up["upload_url"].startswith("http") and settings.bucket in up["upload_url"]
    r = client.post("/release_task", json={"task_type": "cover", "src_audio_key": up["key"]})
    assert r.status_code == 400  # nothing uploaded yet
    backend.blobs.put(up["key"], b"RIFFsrc", "audio/wav")  # what the client's PUT to S3 does
    r = client.post("/release_task", json={"task_type": "cover", "src_audio_key": up["key"], "duration": 10,
                                           "batch_size": 1})
    assert r.status_code == 200, r.text


def test_multipart_and_429_on_aws(settings, tmp_path):
    from tests.aws_support import aws_backend

    with aws_backend(tmp_path, settings, queue_maxsize=1) as backend:  # the queue's bound is built in
        client = TestClient(create_app(backend.settings, backend))
        files = {"src_audio": ("s.wav", b"RIFFdata", "audio/wav")}
        assert client.post("/release_task", data={"task_type": "cover"}, files=files).status_code == 200
        r = client.post("/release_task", data={"task_type": "cover"}, files=files)
        assert r.status_code == 429
        assert backend.store.counts()["total"] == 1
        stats = client.get("/v1/stats").json()["data"]
        assert stats["jobs"]["queued"] == 1 and stats["queue_maxsize"] == 1


def test_cancel_and_a_results_file_as_source_on_aws(aws_api):
    settings, backend, client = aws_api
    done = client.post("/release_task", json={"prompt": "p", "duration": 10, "batch_size": 1}).json()["data"]["task_id"]
    waiting = client.post("/release_task", json={"prompt": "q", "duration": 10}).json()["data"]["task_id"]
    assert client.post(f"/v1/tasks/{waiting}/cancel").json()["data"]["cancelled_now"] is True
    worker = _run(settings, backend)
    assert backend.store.get(waiting).status == "cancelled" and backend.store.get(done).status == "succeeded"
    # the result's S3 object is copied into the cover task's own upload
    file_url = json.loads(client.post("/query_result", json={"task_id_list": [done]}).json()["data"][0]["result"])[0]["file"]
    r = client.post("/release_task", json={"task_type": "cover", "src_audio_path": file_url, "duration": 10,
                                           "batch_size": 1})
    assert r.status_code == 200, r.text
    cover = r.json()["data"]["task_id"]
    key = backend.store.get(cover).request.src_audio_key
    assert backend.blobs.get(key) == backend.blobs.get(backend.store.get(done).result.audios[0].key)
    while worker.run_once(0.01):
        pass
    assert backend.store.get(cover).status == "succeeded"
