"""A chat answer whose audio cannot be read: the 200 of a chat completion goes out before its audio is read
(the answer is written as it is encoded), so a missing file used to give a 200 with JSON cut short, and the
stream stopped in the middle of a `data:` line. Now the answer is an error status naming the file, and the
stream ends with a whole error chunk and [DONE]; a file lost during the read still ends in valid JSON."""
from __future__ import annotations

import dataclasses
import json
import threading

from fastapi.testclient import TestClient

from engine.request import GenerationRequest
from handlers.openrouter import create_openrouter_app, responses
from service.embedded import make_embedded_backend
from service.embedded.files import FileBlobStore
from service.records import AudioFile, TaskRecord, TaskResult
from service.worker import Worker
from tests.support_engine import SineEngine

KEY = "sk-lost"
BODY = {"messages": [{"role": "user", "content": "<prompt>x</prompt>"}], "audio_config": {"duration": 10}}


def test_a_finished_chat_whose_audio_is_gone_is_an_error_not_a_cut_200(settings, tmp_path):
    settings = settings.model_copy(update={"openrouter_api_key": KEY})
    backend = make_embedded_backend(settings)
    worker = Worker(settings, backend, SineEngine(settings.model_names), worker_id="w")
    worker.publish_models()
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_seconds": 0.05}, daemon=True)
    thread.start()
    # The API reads a store that lacks what the worker wrote: as if the files were deleted once the task ended
    lost = dataclasses.replace(backend, blobs=FileBlobStore(str(tmp_path / "emptied")))
    client = TestClient(create_openrouter_app(settings, lost, poll_seconds=0.02))
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        r = client.post("/v1/chat/completions", json=BODY, headers=auth)
        assert r.status_code == 410, r.text
        task_id = r.headers["x-task-id"]
        assert "no longer stored" in r.json()["detail"] and task_id in r.json()["detail"]
        with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}, headers=auth) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]  # every line whole JSON
        assert not any("audio" in c["choices"][0]["delta"] for c in chunks)
        assert "no longer stored" in chunks[-2]["choices"][0]["delta"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "error"
    finally:
        worker.request_stop()
        thread.join(10)


def _record(tmp_path) -> tuple[TaskRecord, FileBlobStore]:
    blobs = FileBlobStore(str(tmp_path / "blobs"))
    blobs.put("outputs/t/0.wav", b"RIFF-first")
    audios = [AudioFile(key="outputs/t/0.wav", format="wav"), AudioFile(key="outputs/t/1.wav", format="wav")]
    return TaskRecord("t", GenerationRequest(prompt="x"), result=TaskResult(audios=audios)), blobs


def test_a_file_lost_while_the_answer_is_written_still_ends_in_valid_json(tmp_path):
    """The second file vanishes after the route's check (the rare race): the JSON closes with the audio read so
    far, finish_reason "error" and why; the stream's audio chunk is one whole line."""
    record, blobs = _record(tmp_path)
    answer = json.loads("".join(responses.completion_parts("c", "m", "text", record, blobs)))
    choice = answer["choices"][0]
    assert len(choice["message"]["audio"]) == 1 and choice["finish_reason"] == "error"
    assert answer["error"]["code"] == 410 and "outputs/t/1.wav" in answer["error"]["message"]
    failed: list[responses.AudioProblem] = []
    line = "".join(responses.Chunks("c", "m").audio_chunk(record, blobs, failed))
    assert line.startswith("data: ") and line.endswith("\n\n") and line.count("\n") == 2
    assert len(json.loads(line[6:])["choices"][0]["delta"]["audio"]) == 1
    assert [p.status for p in failed] == [410]
