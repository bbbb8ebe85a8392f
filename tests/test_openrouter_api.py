"""The OpenAI-compatible API in process: every input mode, the response and stream shapes, the
official `openai` client, auth, errors, and a task that outlives the wait. A worker with the
sine engine runs in a thread against the same embedded backend."""
from __future__ import annotations

import base64
import io
import json
import threading

import openai
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from handlers.app import create_app
from handlers.openrouter import create_openrouter_app
from handlers.openrouter.messages import looks_like_lyrics
from service.embedded import make_embedded_backend
from service.worker import Worker
from tests.support_engine import SineEngine, encode, tone

KEY = "sk-or-test"


class Chat:
    def __init__(self, settings, worker_running: bool = True, **overrides):
        self.settings = settings = settings.model_copy(update=overrides)
        self.backend = make_embedded_backend(settings)
        self.engine = SineEngine(settings.model_names)
        self.worker = Worker(settings, self.backend, self.engine, worker_id="w")
        self.worker.publish_models()
        self.thread = threading.Thread(target=self.worker.run_forever, kwargs={"poll_seconds": 0.05}, daemon=True)
        if worker_running:
            self.thread.start()
        self.client = TestClient(create_openrouter_app(settings, self.backend, poll_seconds=0.02))
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def post(self, expect: int = 200, **body) -> dict:
        r = self.client.post("/v1/chat/completions", json=body, headers=self.headers)
        assert r.status_code == expect, r.text
        return r.json()

    def last_request(self) -> dict:
        return self.engine.calls[-1]["request"].model_dump()

    def stop(self):
        self.worker.request_stop()
        if self.thread.is_alive():
            self.thread.join(10)


@pytest.fixture
def chat(settings):
    c = Chat(settings, openrouter_api_key=KEY)
    yield c
    c.stop()


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def audio_bytes(url: str) -> bytes:
    head, data = url.split(",", 1)
    assert head.startswith("data:audio/") and head.endswith(";base64")
    return base64.b64decode(data)


def test_tagged_mode_answers_with_audio_and_metadata(chat):
    body = chat.post(model="acestep/acestep-v15-turbo",
                     messages=user("<prompt>gentle acoustic ballad</prompt>\n<lyrics>[Verse]\nSunlight</lyrics>"),
                     audio_config={"duration": 12, "bpm": 90, "key_scale": "C major", "time_signature": "3/4",
                                   "vocal_language": "en", "format": "wav"})
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "acestep/acestep-v15-turbo"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    for line in ("**Caption:** gentle acoustic ballad", "**BPM:** 90", "**Key:** C major",
                 "**Time Signature:** 3", "## Lyrics\n[Verse]\nSunlight"):
        assert line in content
    audio = choice["message"]["audio"]
    assert len(audio) == 1 and audio[0]["type"] == "audio_url"
    data, sr = sf.read(io.BytesIO(audio_bytes(audio[0]["audio_url"]["url"])))
    assert sr == 16000 and abs(len(data) / sr - 12) < 0.01
    sent = chat.last_request()
    assert (sent["prompt"], sent["lyrics"], sent["bpm"], sent["audio_format"], sent["batch_size"]) == \
        ("gentle acoustic ballad", "[Verse]\nSunlight", 90, "wav", 1)
    assert "random-weight demo" in content  # the sine engine says it is no real model


def test_input_modes_reach_the_engine_as_upstream_reads_them(chat):
    chat.post(messages=user("[Verse 1]\nWalking down the street\n\n[Chorus]\nDance with me"),
              audio_config={"duration": 10})
    assert chat.last_request()["lyrics"].startswith("[Verse 1]") and chat.last_request()["prompt"] == ""
    chat.post(messages=user("Energetic EDM with heavy bass"), lyrics="[Drop]\nla la",
              audio_config={"bpm": 128, "duration": 10})
    sent = chat.last_request()
    assert (sent["prompt"], sent["lyrics"], sent["bpm"]) == ("Energetic EDM with heavy bass", "[Drop]\nla la", 128)
    chat.post(messages=user("<prompt>Epic orchestral score</prompt>"),
              audio_config={"instrumental": True, "duration": 10})
    assert chat.last_request()["lyrics"] == "[Instrumental]"
    # a description without tags is sample mode; with no LM on this server it becomes the caption
    body = chat.post(messages=[{"role": "system", "content": "ignored"},
                               {"role": "assistant", "content": "earlier answer"},
                               *user("a soft folk song about home")], audio_config={"duration": 10})
    assert chat.last_request()["prompt"] == "a soft folk song about home"
    assert chat.last_request()["sample_mode"] is False
    assert "no 5 Hz LM" in body["choices"][0]["message"]["content"]
    # generation fields and a seed list
    body = chat.post(messages=user("<prompt>Lo-fi</prompt>"), batch_size=3, seed="42,123,456",
                     guidance_scale=5.5, temperature=0.7, top_p=0.8, inference_steps=12, thinking=False,
                     audio_config={"instrumental": True, "duration": 10})
    sent = chat.last_request()
    assert (sent["seeds"], sent["guidance_scale"], sent["lm_temperature"], sent["lm_top_p"],
            sent["inference_steps"]) == ([42, 123, 456], 5.5, 0.7, 0.8, 12)
    assert len(body["choices"][0]["message"]["audio"]) == 3


def test_explicit_sample_mode_needs_an_lm_and_uses_the_text_as_query(chat):
    r = chat.post(expect=400, messages=user("an upbeat pop song"), sample_mode=True)
    assert "5 Hz LM" in r["detail"]
    chat.engine.lm_loaded = True  # a worker that says it runs an LM (the sine engine ignores it)
    chat.worker.publish_models()
    chat.backend.store.record_heartbeat(chat.worker.heartbeat().model_copy(update={"lm_model": "lm"}))
    chat.post(messages=user("an upbeat pop song"), sample_mode=True, audio_config={"duration": 10})
    sent = chat.last_request()
    assert (sent["sample_mode"], sent["sample_query"], sent["prompt"]) == (True, "an upbeat pop song", "")


def test_upstreams_client_test_bodies_full_parameters_and_streamed_sample_mode(settings):
    """Two of the nine checks in upstream's openrouter/client_test.py that the tests above do not send as such:
    its "full parameters" body (LM switches beside the audio settings) and a streamed sample-mode request."""
    chat = Chat(settings.model_copy(update={"openrouter_api_key": KEY}), worker_running=False)
    sine_info = chat.engine.describe()
    chat.engine.describe = lambda: {**sine_info, "lm_model": "lm"}  # its heartbeats say it runs an LM (ignored)
    chat.engine.lm_loaded = True
    chat.worker.publish_models()
    chat.thread.start()
    try:
        _send_upstreams_lm_bodies(chat)
    finally:
        chat.stop()


def _send_upstreams_lm_bodies(chat):
    text = "<prompt>Dreamy lo-fi hip hop beat with vinyl crackle</prompt><lyrics>[inst]</lyrics>"
    body = chat.post(messages=user(text),
                     temperature=0.9, top_p=0.95, thinking=False, use_cot_caption=True, use_cot_language=False,
                     use_format=True, audio_config={"bpm": 85, "duration": 10, "instrumental": True})
    sent = chat.last_request()
    assert (sent["lm_temperature"], sent["lm_top_p"], sent["thinking"], sent["use_cot_caption"],
            sent["use_cot_language"], sent["use_format"], sent["bpm"], sent["audio_duration"]) == \
        (0.9, 0.95, False, True, False, True, 85, 10)
    assert sent["prompt"] == "Dreamy lo-fi hip hop beat with vinyl crackle"
    assert len(body["choices"][0]["message"]["audio"]) == 1
    with chat.client.stream("POST", "/v1/chat/completions", headers=chat.headers,
                            json={"messages": user("Generate a cheerful guitar piece"), "stream": True,
                                  "sample_mode": True, "audio_config": {"instrumental": True, "duration": 10}}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    sent = chat.last_request()
    assert (sent["sample_mode"], sent["sample_query"]) == (True, "Generate a cheerful guitar piece")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert any(c["choices"][0]["delta"].get("audio") for c in chunks)


def test_input_audio_routes_to_source_and_reference(chat):
    src, ref = encode(tone(1, 10.0), "wav"), encode(tone(2, 10.0), "wav")
    parts = [{"type": "text", "text": "<prompt>Jazz cover</prompt>"},
             {"type": "input_audio", "input_audio": {"data": base64.b64encode(src).decode(), "format": "wav"}},
             {"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64," + base64.b64encode(ref).decode(),
                                                     "format": "wav"}}]
    chat.post(messages=user(parts), task_type="cover", audio_cover_strength=0.8, audio_config={"duration": 10})
    call = chat.engine.calls[-1]
    assert call["src_audio"] == src and call["reference_audio"] == ref
    assert call["request"].task_type == "cover" and call["request"].audio_cover_strength == 0.8
    chat.post(messages=user(parts[:2]), task_type="repaint", repainting_start=1.0, repainting_end=5.0,
              audio_config={"duration": 10})
    call = chat.engine.calls[-1]
    assert call["src_audio"] == src and call["reference_audio"] is None
    assert (call["request"].repainting_start, call["request"].repainting_end) == (1.0, 5.0)
    chat.post(messages=user(parts[:2]), audio_config={"duration": 10})  # text2music: a style reference
    assert chat.engine.calls[-1]["reference_audio"] == src and chat.engine.calls[-1]["src_audio"] is None


@pytest.mark.parametrize("body, status, detail", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "no prompt, lyrics"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "no user message"),
    ({"messages": user([{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "mp3"}}])},
     400, "input_audio #1: data must be base64"),
    ({"messages": user("<prompt>x</prompt>"), "audio_config": {"duration": 5}}, 400, "between 10 and 600"),
    ({"messages": user("<prompt>x</prompt>"), "task_type": "cover"}, 400, "needs source audio"),
    ({"messages": user("<prompt>x</prompt>"), "seed": "a,b"}, 400, "seed"),
    ({"messages": "hello"}, 400, "messages"),
])
def test_bad_requests_are_400_naming_the_problem(chat, body, status, detail):
    r = chat.client.post("/v1/chat/completions", json=body, headers=chat.headers)
    assert r.status_code == status and detail in r.json()["detail"], r.text


def test_malformed_json_and_auth(chat):
    r = chat.client.post("/v1/chat/completions", content=b"{nope", headers={**chat.headers,
                                                                             "Content-Type": "application/json"})
    assert r.status_code == 400
    body = {"messages": user("<prompt>x</prompt>")}
    assert chat.client.post("/v1/chat/completions", json=body).status_code == 401
    r = chat.client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "Invalid API key"
    assert chat.client.get("/v1/models").status_code == 401
    assert chat.client.get("/health").status_code == 200  # no auth, as upstream


def test_failed_generation_is_an_error_with_its_reason(chat):
    # The engine refusing what the request asked for (as it refuses input audio it cannot decode) is the
    # client's side: a 422 with the reason, not a 500 (handlers/openrouter/routes.py, _FAILURE_STATUS)
    r = chat.post(expect=422, messages=user("<prompt>PLEASE FAIL</prompt>"), audio_config={"duration": 10})
    assert r["detail"] == "the test engine was asked to fail"


def test_streaming_sends_upstreams_chunk_sequence(chat):
    with chat.client.stream("POST", "/v1/chat/completions", headers=chat.headers,
                            json={"messages": user("<prompt>happy</prompt><lyrics>[Verse]\nhey</lyrics>"),
                                  "stream": True, "audio_config": {"duration": 10}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        task_id = r.headers["x-task-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "Generating music"}
    assert "## Lyrics\n[Verse]\nhey" in "".join(d.get("content", "") for d in deltas)
    audio = [d["audio"] for d in deltas if "audio" in d]
    assert len(audio) == 1 and audio_bytes(audio[0][0]["audio_url"]["url"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and deltas[-1] == {}
    assert chat.backend.store.get(task_id).status == "succeeded"


def test_stream_heartbeats_while_waiting_and_reports_failure(settings):
    # nobody runs the task: only heartbeats, then the wait limit
    chat = Chat(settings, worker_running=False, openrouter_api_key=KEY, openrouter_max_wait=4.5)
    with chat.client.stream("POST", "/v1/chat/completions", headers=chat.headers,
                            json={"messages": user("<prompt>x</prompt>"), "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    deltas = [json.loads(line[6:])["choices"][0] for line in lines[:-1]]
    assert [d["delta"].get("content") for d in deltas].count(".") >= 1  # every 2 s (fewer on a busy machine)
    assert "still generating after" in deltas[-2]["delta"]["content"] and deltas[-1]["finish_reason"] == "error"
    task_id = r.headers["x-task-id"]
    assert chat.backend.store.get(task_id).status == "queued"  # not lost: it runs when a worker comes


def test_non_streaming_wait_limit_is_a_504_naming_the_task(settings):
    chat = Chat(settings, worker_running=False, openrouter_api_key=KEY, openrouter_max_wait=0.1)
    r = chat.client.post("/v1/chat/completions", json={"messages": user("<prompt>x</prompt>")}, headers=chat.headers)
    assert r.status_code == 504
    task_id = r.headers["x-task-id"]
    assert task_id in r.json()["detail"] and "/query_result" in r.json()["detail"]
    chat.worker.run_once(0.1)  # the task goes on
    assert chat.backend.store.get(task_id).status == "succeeded"


@pytest.mark.parametrize("given, ran", [
    ("acemusic/acestep-v1.5-turbo", "acestep-v15-turbo"),  # upstream's standalone id: the same model
    ("acestep/acestep-v15-base", "acestep-v15-base"),
    ("acestep-v15-base", "acestep-v15-base"),
    ("acestep/music-gen-v1", "acestep-v15-turbo"),  # unknown ids run the default model, as upstream
    ("gpt-4o", "acestep-v15-turbo"),
])
def test_any_model_id_runs_and_the_response_names_the_model_that_ran(settings, given, ran):
    chat = Chat(settings, openrouter_api_key=KEY, config_path="acestep-v15-turbo", config_path2="acestep-v15-base")
    try:
        body = chat.post(model=given, messages=user("<prompt>x</prompt>"), audio_config={"duration": 10})
        assert body["model"] == "acestep/" + ran
        assert (chat.last_request()["model"] or chat.settings.default_model) == ran
    finally:
        chat.stop()


def test_models_list_in_openai_shape(chat):
    assert chat.client.get("/api/v1/models", headers=chat.headers).json() == \
        chat.client.get("/v1/models", headers=chat.headers).json()  # upstream's standalone server's path
    body = chat.client.get("/v1/models", headers=chat.headers).json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == "acestep/acestep-v15-turbo" and model["object"] == "model"
    assert model["input_modalities"] == ["text", "audio"] and model["output_modalities"] == ["audio", "text"]
    assert model["pricing"]["request"] == "0" and model["random_weights"] is True


def test_the_official_openai_client(chat):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=chat.client)
    assert [m.id for m in client.models.list()] == ["acestep/acestep-v15-turbo"]
    done = client.chat.completions.create(
        model="acestep/acestep-v15-turbo", messages=[{"role": "user", "content": "<prompt>jazz</prompt>"}],
        extra_body={"audio_config": {"duration": 10, "instrumental": True}, "batch_size": 2})
    # upstream sends a list of audio parts where OpenAI types one object: read it untyped
    message = done.model_dump(warnings=False)["choices"][0]["message"]
    assert "**Caption:** jazz" in message["content"] and len(message["audio"]) == 2
    stream = client.chat.completions.create(
        model="acestep/acestep-v15-turbo", messages=[{"role": "user", "content": "<prompt>jazz</prompt>"}],
        stream=True, extra_body={"audio_config": {"duration": 10}})
    chunks = [c.model_dump(warnings=False) for c in stream]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert any((c["choices"][0]["delta"].get("audio") or []) for c in chunks)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=chat.client).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="acestep/nope", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"audio_config": {"duration": 5}})


def test_completions_on_the_ace_step_listener_too(chat):
    """Upstream's API server serves the chat beside its own routes: same tasks, same shapes; its key is the
    ACE-Step listener's (its /v1/models and /health stay the ACE-Step API's own)."""
    api = TestClient(create_app(chat.settings.model_copy(update={"api_key": "sk-main"}), chat.backend))
    body = {"model": "acemusic/acestep-v1.5-turbo", "messages": user("<prompt>jazz</prompt>"),
            "audio_config": {"duration": 10, "format": "wav"}}
    assert api.post("/v1/chat/completions", json=body, headers=chat.headers).status_code == 401  # the chat's key
    r = api.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-main"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["model"] == "acestep/acestep-v15-turbo" and "**Caption:** jazz" in done["choices"][0]["message"]["content"]
    assert sf.info(io.BytesIO(audio_bytes(done["choices"][0]["message"]["audio"][0]["audio_url"]["url"]))).duration > 9
    assert chat.backend.store.get(r.headers["X-Task-ID"]).status == "succeeded"
    assert "models" in api.get("/v1/models", headers={"Authorization": "Bearer sk-main"}).json()["data"]


def test_key_falls_back_to_the_ace_step_key(settings):
    chat = Chat(settings, worker_running=False, api_key="sk-main")
    assert chat.client.get("/v1/models").status_code == 401
    assert chat.client.get("/v1/models", headers={"Authorization": "Bearer sk-main"}).status_code == 200


def test_lyrics_heuristic():
    assert looks_like_lyrics("[chorus]\nla")
    assert looks_like_lyrics("short line\nshort line\nshort line\nshort line")
    assert not looks_like_lyrics("An upbeat pop song about summer and travel")


def test_raw_httpx_streaming_client(chat):
    """The doc's own client loop (httpx streaming; TestClient is an httpx.Client on the ASGI app)."""
    content, audio_url = [], None
    with chat.client.stream("POST", "/v1/chat/completions", headers=chat.headers, json={
            "messages": user("<prompt>cheerful guitar</prompt>"), "stream": True,
            "audio_config": {"instrumental": True, "duration": 10}}) as response:
        for line in response.iter_lines():
            if not line or not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            delta = json.loads(line[6:])["choices"][0]["delta"]
            content.append(delta.get("content") or "")
            if delta.get("audio"):
                audio_url = delta["audio"][0]["audio_url"]["url"]
    assert "cheerful guitar" in "".join(content) and audio_url and audio_bytes(audio_url)


def test_webhook_url_on_a_chat_request_is_checked_like_release_tasks(chat):
    r = chat.post(expect=400, messages=user("<prompt>x</prompt>"), webhook_url="http://127.0.0.1:9/hook")
    assert "private, loopback" in r["detail"]
    allowed = chat.settings.model_copy(update={"webhook_allow_private": True})
    client = TestClient(create_openrouter_app(allowed, chat.backend, poll_seconds=0.02))
    r = client.post("/v1/chat/completions", headers=chat.headers, json={
        "messages": user("<prompt>x</prompt>"), "webhook_url": "http://127.0.0.1:9/hook",
        "audio_config": {"duration": 10}})
    assert r.status_code == 200
    assert chat.backend.store.get(r.headers["x-task-id"]).webhook_url == "http://127.0.0.1:9/hook"


def test_streams_closed_by_a_server_shutdown_leave_their_tasks_to_finish(settings):
    from handlers.openrouter import waiting

    chat = Chat(settings, worker_running=False, openrouter_max_wait=0.05)
    r = chat.client.post("/v1/chat/completions", json={"messages": user("<prompt>x</prompt>")}, headers=chat.headers)
    task_id = r.headers["x-task-id"]
    waiting.server_stopping.set()
    try:
        waiting.cancel_in_background(chat.backend, task_id, lambda t: None)
    finally:
        waiting.server_stopping.clear()
    assert chat.backend.store.get(task_id).status == "queued"
    chat.worker.run_once(0.1)  # the draining workers finish it
    assert chat.backend.store.get(task_id).status == "succeeded"
