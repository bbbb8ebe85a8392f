"""`make run` on a checkpoint folder in ACE-Step's original layout (as the official repos publish it):
the worker converts it once and the service makes audio with it, labelled as the demo it is."""
from __future__ import annotations

import io
import json

import httpx
import soundfile as sf

from engine.weights.checkpoints import build_tiny_checkpoint
from tests.live_server import live_server


def test_service_serves_an_original_layout_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    build_tiny_checkpoint(checkpoints / "acestep-v15-turbo", layout="original")
    env = {"ACESTEP_DEMO_IF_MISSING": "false", "OMP_NUM_THREADS": "1"}
    with live_server(str(tmp_path / "data"), str(checkpoints), env=env) as server:
        server.wait_for_worker()
        r = httpx.post(server.base_url + "/release_task", timeout=10, json={
            "prompt": "piano", "audio_duration": 10, "batch_size": 1, "audio_format": "wav", "inference_steps": 2})
        entry = server.wait_done(r.json()["data"]["task_id"], timeout=120)
        assert entry["status"] == 1, entry
        item = json.loads(entry["result"])[0]
        assert "random weights" in item["generation_info"].lower()
        audio = httpx.get(server.base_url + item["file"], timeout=10)
        assert sf.info(io.BytesIO(audio.content)).duration == 10.0
    assert (checkpoints / ".diffusers" / "acestep-v15-turbo" / "model_index.json").is_file()
