"""/query_result shapes, /v1/audio downloads, and the seed guide's Python client flow verbatim."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import time
import types
from urllib.parse import parse_qs, urlparse

import pytest
import soundfile as sf

from service.ports import QueueFull
from tests.api_support import make_api
from tests.support_engine import tone


@pytest.fixture
def api(settings):
    return make_api(settings)


def test_succeeded_result_shape(api):
    task_id = api.submit(prompt="upbeat pop", lyrics="[Instrumental]", batch_size=2, seed="11,22", bpm=90,
                         keyscale="C major", timesignature="4", duration=12, audio_format="wav")
    api.run_worker()
    entry = api.query(task_id)[0]
    assert entry["task_id"] == task_id and entry["status"] == 1
    assert isinstance(entry["result"], str) and isinstance(entry["progress_text"], str)
    items = json.loads(entry["result"])
    assert len(items) == 2
    for item, seed in zip(items, (11, 22)):
        for key in ("file", "wave", "status", "create_time", "env", "prompt", "lyrics", "metas", "generation_info",
                    "seed_value", "lm_model", "dit_model", "progress", "stage"):
            assert key in item, key
        assert item["status"] == 1 and item["stage"] == "succeeded" and item["progress"] == 1.0
        assert item["prompt"] == "upbeat pop" and item["lyrics"] == "[Instrumental]"
        assert set(item["metas"]) == {"bpm", "duration", "genres", "keyscale", "timesignature", "prompt", "lyrics"}
        assert item["metas"]["bpm"] == 90 and item["metas"]["keyscale"] == "C major"
        assert item["metas"]["timesignature"] == "4" and item["metas"]["duration"] == 12
        assert item["seed_value"] == "11,22" and item["seed"] == seed
        assert item["dit_model"] == "acestep-v15-turbo"
        assert "random weights" in item["generation_info"]
        assert item["generation_info_detail"]["random_weights"] is True
        assert item["generation_info_detail"]["test_engine"] is True
        assert re.match(r"^/v1/audio\?path=outputs%2F[0-9a-f-]+%2F[0-9]+-[0-9]\.wav&expires=\d+&sig=[0-9a-f]{64}$",
                        item["file"]), item["file"]
        assert "/" not in parse_qs(urlparse(item["file"]).query)["path"][0].split("outputs/")[0]
    # the file URL plays without headers and is the seed's tone
    for item, seed in zip(items, (11, 22)):
        r = api.client.get(item["file"])
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        data, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        assert abs(len(data) / sr - 12) < 0.01
        assert abs(data[:100] - tone(seed, 12)[:100]).max() < 1e-3


def test_items_show_the_song_the_lm_wrote_and_keep_the_request_text(settings):
    """Upstream's item: prompt/lyrics are what sample/format mode wrote (not phase 1's caption); the metas keep
    the user's text; ours keeps the request's text in generation_info_detail.request too."""
    from engine.request import GenerationRequest
    from engine.types import GenerationInfo
    from service.records import SUCCEEDED, AudioFile, TaskRecord, TaskResult
    from service.signing_keys import ephemeral_keys
    from service.task_payload import succeeded_items

    info = GenerationInfo(caption="phase 1's caption", lm_caption="a calm piano ballad in D", lm_lyrics="[verse] oh")
    record = TaskRecord(task_id="t", request=GenerationRequest(sample_query="calm piano", sample_mode=True),
                        status=SUCCEEDED, result=TaskResult(audios=[AudioFile(key="outputs/t/1-0.mp3", format="mp3")],
                                                            generation_info=info))
    item = succeeded_items(record, settings, ephemeral_keys())[0]
    assert (item["prompt"], item["lyrics"]) == ("a calm piano ballad in D", "[verse] oh")
    assert (item["metas"]["prompt"], item["metas"]["lyrics"]) == ("", "")  # the user's own (sample mode: none)
    detail = item["generation_info_detail"]
    assert detail["caption"] == "phase 1's caption"
    assert detail["request"] == {"prompt": "", "lyrics": "", "sample_query": "calm piano"}
    plain = dataclasses.replace(record, request=GenerationRequest(prompt="jazz", lyrics="la"),
                                result=TaskResult(generation_info=GenerationInfo(caption="phase 1's")))
    item = succeeded_items(plain, settings, ephemeral_keys())[0]  # thinking alone: the request's text (upstream: not the CoT's)
    assert (item["prompt"], item["lyrics"]) == ("jazz", "la") and "sample_query" not in \
        item["generation_info_detail"]["request"]


@pytest.mark.parametrize("fmt,ext,media", [("mp3", "mp3", "audio/mpeg"), ("wav", "wav", "audio/wav"),
                                            ("flac", "flac", "audio/flac"), ("wav32", "wav", "audio/wav"),
                                            ("opus", "opus", "audio/ogg"), ("aac", "aac", "audio/aac")])
def test_audio_media_types_and_range(api, fmt, ext, media):
    task_id = api.submit(prompt="x", batch_size=1, audio_format=fmt, duration=10)
    api.run_worker()
    item = api.items(task_id)[0]
    url = item["file"]
    assert url.split("&")[0].endswith("." + ext) and item["format"] == fmt
    full = api.client.get(url)
    assert full.status_code == 200 and full.headers["content-type"] == media
    if fmt == "aac":  # ADTS: libsndfile does not read it
        assert full.content[:2] == b"\xff\xf1"
    else:
        info = sf.info(io.BytesIO(full.content))
        assert info.samplerate == 16000 and (info.subtype == "FLOAT") == (fmt == "wav32")
    part = api.client.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == full.content[:100]
    assert part.headers["content-range"].startswith("bytes 0-99/")
    head = api.client.head(url)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(full.content)


def test_queued_running_failed_and_unknown(api):
    first = api.submit(prompt="one")
    second = api.submit(prompt="two")
    items = api.items(second)
    assert items[0]["stage"] == "queued" and items[0]["queue_position"] == 2 and items[0]["status"] == 0
    assert api.query(first)[0]["status"] == 0 and api.items(first)[0]["queue_position"] == 1
    # running: claimed with progress
    attempt = api.backend.store.claim(first, "w").attempt
    api.backend.store.update_progress(first, attempt, 0.4, "Generating music...")
    entry = api.query(first)[0]
    item = json.loads(entry["result"])[0]
    assert entry["status"] == 0 and item["progress"] == 0.4 and item["stage"] == "Generating music..."
    assert api.items(second)[0]["queue_position"] == 1
    # failed, with its message
    api.backend.store.finish(first, attempt, error="the model ran out of memory")
    entry = api.query(first)[0]
    item = json.loads(entry["result"])[0]
    assert entry["status"] == 2 and item["status"] == 2 and item["stage"] == "failed"
    assert item["error"] == "the model ran out of memory" and entry["error"] == item["error"]
    # unknown
    entry = api.query("00000000-0000-0000-0000-000000000000")[0]
    assert entry["status"] == 2 and json.loads(entry["result"])[0]["error"] == "task not found"


def test_engine_failure_reaches_the_client(api):
    task_id = api.submit(prompt="PLEASE FAIL now")
    api.run_worker()
    entry = api.query(task_id)[0]
    assert entry["status"] == 2 and "asked to fail" in json.loads(entry["result"])[0]["error"]


def test_query_order_duplicates_and_input_forms(api):
    a, b = api.submit(prompt="a"), api.submit(prompt="b")
    data = api.query(b, a, b, "missing")
    assert [d["task_id"] for d in data] == [b, a, b, "missing"]
    assert [d["status"] for d in data] == [0, 0, 0, 2]
    as_string = api.client.post("/query_result", json={"task_id_list": json.dumps([a])}).json()["data"]
    form = api.client.post("/query_result", data={"task_id_list": json.dumps([a, b])}).json()["data"]
    raw = api.client.post("/query_result", content=f'task_id_list=["{a}"]'.encode(),
                          headers={"Content-Type": ""}).json()["data"]
    assert [d["task_id"] for d in as_string] == [a] and [d["task_id"] for d in form] == [a, b]
    assert [d["task_id"] for d in raw] == [a]
    assert api.client.post("/query_result", json={}).json()["data"] == []
    for bad in ({"task_id_list": 5}, {"task_id_list": [1, 2]}, {"task_id_list": "[bad"},
                {"task_id_list": ["x"] * 500}):
        r = api.client.post("/query_result", json=bad)
        assert r.status_code == 400 and "task_id_list" in r.json()["detail"]
    assert api.client.post("/query_result", content=b"[1]", headers={"Content-Type": "application/json"}
                           ).status_code == 400


def test_audio_only_for_succeeded_tasks_and_their_keys(api, tmp_path):
    done = api.submit(prompt="x", batch_size=1, duration=10)
    api.run_worker()
    url = api.items(done)[0]["file"]
    key = parse_qs(urlparse(url).query)["path"][0]
    assert api.client.get("/v1/audio", params={"path": key}).status_code == 200  # auth off: no sig needed
    # a file planted under outputs/ for a task that does not own it
    pending = api.submit(prompt="y")
    api.backend.blobs.put(f"outputs/{pending}/1-0.mp3", b"x", "audio/mpeg")
    assert api.client.get("/v1/audio", params={"path": f"outputs/{pending}/1-0.mp3"}).status_code == 404
    assert api.client.get("/v1/audio", params={"path": f"outputs/{done}/9-9.mp3"}).status_code == 404
    assert api.client.get("/v1/audio", params={"path": "outputs/nope/0-0.mp3"}).status_code == 404
    for bad in ("/etc/passwd", "../../etc/passwd", f"outputs/{done}/../../acestep.db", "acestep.db",
                "outputs/x/0.txt", "uploads/x/../../y", "C:\\windows\\win.ini", f"outputs/{done}/%2e%2e/x.mp3"):
        r = api.client.get("/v1/audio", params={"path": bad})
        assert r.status_code in (403, 404), (bad, r.status_code)
        assert r.headers["content-type"].startswith("application/json")
    r = api.client.get("/v1/audio", params={"path": "/etc/passwd"})
    assert r.status_code == 403 and r.json() == {"detail": "Access denied: path outside allowed directory"}
    r = api.client.get("/v1/audio")
    assert r.status_code == 422


class _Presigning:
    """Wraps the file blob store to look like S3: no local path, presigned GET URLs."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def local_path(self, key):
        return None

    def presigned_get_url(self, key, expires_seconds):
        return f"https://bucket.s3.example.com/{key}?X-Amz-Expires={expires_seconds}"


def test_presigned_blob_store_redirects(api):
    task_id = api.submit(prompt="x", batch_size=1, duration=10)
    api.run_worker()
    api.backend.blobs = _Presigning(api.backend.blobs)
    url = api.items(task_id)[0]["file"]
    r = api.client.get(url, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].startswith("https://bucket.s3.example.com/outputs/")


def test_queue_full_is_429_and_leaves_nothing(settings, tmp_path):
    api = make_api(settings, queue_maxsize=1)
    api.submit(prompt="first")
    before = api.backend.store.counts()
    r = api.client.post("/release_task", data={"task_type": "cover", "prompt": "second"},
                        files={"src_audio": ("s.wav", b"RIFFdata", "audio/wav")})
    assert r.status_code == 429 and r.json() == {"detail": "Server busy: queue is full"}
    assert api.backend.store.counts() == before
    uploads = tmp_path / "data" / "blobs" / "uploads"
    assert not uploads.exists() or not any(p.is_file() for p in uploads.rglob("*"))
    stats = api.client.get("/v1/stats").json()["data"]
    assert stats["queue_maxsize"] == 1 and stats["jobs"]["total"] == 1


# --- the seed guide's Python client, verbatim, against the TestClient ------------------------------

SEED_CLIENT = '''
import requests
import json
import time

API_BASE = "http://localhost:8001"

def create_music(prompt, lyrics="[Instrumental]", thinking=True):
    """음악 생성 작업 생성"""
    url = f"{API_BASE}/release_task"
    payload = {
        "prompt": prompt,
        "lyrics": lyrics,
        "thinking": thinking,
        "inference_steps": 8,
        "batch_size": 2,
    }

    response = requests.post(url, json=payload)
    response.raise_for_status()
    data = response.json()

    return data["data"]["task_id"]


def query_task(task_id):
    """작업 상태 쿼리"""
    url = f"{API_BASE}/query_result"
    payload = {"task_id_list": [task_id]}

    response = requests.post(url, json=payload)
    response.raise_for_status()
    data = response.json()

    return data["data"][0]


def wait_for_completion(task_id, timeout=600, poll_interval=2):
    """작업 완료 대기"""
    start_time = time.time()

    while True:
        if time.time() - start_time > timeout:
            raise TimeoutError(f"Task {task_id} timed out after {timeout}s")

        task = query_task(task_id)
        status = task["status"]

        if status == 1:  # succeeded
            return json.loads(task["result"])
        elif status == 2:  # failed
            raise RuntimeError(f"Task {task_id} failed")

        # status == 0 (queued/running)
        print(f"Task {task_id} is still running...")
        time.sleep(poll_interval)


def download_audio(file_url, output_path):
    """오디오 파일 다운로드"""
    url = f"{API_BASE}{file_url}"

    response = requests.get(url)
    response.raise_for_status()

    with open(output_path, "wb") as f:
        f.write(response.content)

    print(f"Downloaded: {output_path}")
'''

SEED_MAIN = '''
task_id = create_music(
    prompt="upbeat pop rock with electric guitars",
    lyrics="[Instrumental]",
    thinking=True
)
print(f"Task created: {task_id}")
print("Waiting for completion...")
results = wait_for_completion(task_id)
for i, result in enumerate(results, 1):
    file_url = result["file"]
    output_path = f"output_{i}.mp3"
    download_audio(file_url, output_path)

    print(f"Sample {i}:")
    print(f"  BPM: {result['metas']['bpm']}")
    print(f"  Key: {result['metas']['keyscale']}")
    print(f"  Seed: {result['seed_value']}")
'''


def _requests_shim(api, polls):
    """`requests.get/post` routed to the TestClient; the worker runs after the first poll."""
    base = "http://localhost:8001"

    def post(url, json=None, data=None, files=None, headers=None):
        path = url[len(base):]
        if path == "/query_result":
            polls.append(1)
            if len(polls) == 2:
                api.run_worker()
        r = api.client.post(path, json=json, data=data, files=files, headers=headers)
        return r

    def get(url, headers=None):
        return api.client.get(url[len(base):], headers=headers)

    return types.SimpleNamespace(post=post, get=get)


def test_seed_python_client_flow_verbatim(api, tmp_path, monkeypatch, capsys):
    polls: list = []
    monkeypatch.setitem(__import__("sys").modules, "requests", _requests_shim(api, polls))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    namespace: dict = {}
    exec(compile(SEED_CLIENT + SEED_MAIN, "seed_client", "exec"), namespace)
    out = capsys.readouterr().out
    assert "is still running" in out and "Downloaded: output_2.mp3" in out
    for i in (1, 2):
        data = (tmp_path / f"output_{i}.mp3").read_bytes()
        assert sf.info(io.BytesIO(data)).format == "MP3"
    assert re.search(r"Seed: \d+,\d+", out)


def test_429_via_queue_full_exception_from_the_queue(api, monkeypatch):
    def full(connection, task_id, max_size, interactive=False):
        raise QueueFull()

    monkeypatch.setattr(api.backend.queue, "insert", full)  # the intake enqueues in its transaction
    r = api.client.post("/release_task", json={"prompt": "x"})
    assert r.status_code == 429 and api.backend.store.counts()["total"] == 0
