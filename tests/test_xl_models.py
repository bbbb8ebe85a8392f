"""The ACE-Step 1.5 XL DiTs served the way a user asks for them (ACESTEP_CONFIG_PATH=acestep-v15-xl-turbo), on
tiny XL-shaped random checkpoints: a transformer wider than its condition encoder, as the published XL (2560 over
2048). One comes from a hub stand-in as upstream's own XL repo holds it (original layout, the DiT bundled with its
vae/ and text encoder), is converted once and generates through the worker; the other sits in the diffusers layout,
as the official -diffusers repos hold it. Turbo vs sft behave as the 2B turbo vs sft do."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from engine.weights import model_sources, original_layout
from engine.weights.checkpoints import build_tiny_checkpoint
from tests.test_engine_model_sources import FakeHub

pytestmark = pytest.mark.integration
XL_TURBO, XL_SFT = "acestep-v15-xl-turbo", "acestep-v15-xl-sft"
UPSTREAM_XL_REPO = "ACE-Step/acestep-v15-xl-turbo"  # upstream's original-layout XL repo (its downloader's source)
TASK = {"prompt": "xl", "lyrics": "[instrumental]", "audio_duration": 10, "inference_steps": 2, "seed": 3,
        "guidance_scale": 7.0, "audio_format": "wav"}


@pytest.fixture(scope="module")
def upstream_xl_repo(tmp_path_factory) -> dict[str, bytes]:
    """The files of a tiny XL turbo laid out as ACE-Step/acestep-v15-xl-turbo is: the DiT's config, weights and
    silence latent at the top, its own vae/ and Qwen3-Embedding-0.6B/ beside them."""
    built = tmp_path_factory.mktemp("published")
    dit = build_tiny_checkpoint(built / XL_TURBO, layout="original")
    files = {p.relative_to(dit).as_posix(): p.read_bytes() for p in dit.rglob("*") if p.is_file()}
    for folder in (original_layout.VAE_DIR, original_layout.TEXT_ENCODER_DIR):
        files.update({p.relative_to(built).as_posix(): p.read_bytes() for p in (built / folder).rglob("*")
                      if p.is_file()})
    return files


def test_tiny_xl_checkpoints_have_a_transformer_wider_than_its_condition_encoder(upstream_xl_repo):
    import json

    config = json.loads(upstream_xl_repo[original_layout.CONFIG_FILE])
    # upstream's XL config.json fields: the DiT's widths, and encoder_* for the narrower encoders
    assert (config["hidden_size"], config["encoder_hidden_size"]) == (96, 64)
    assert config["encoder_num_attention_heads"] < config["num_attention_heads"]
    assert config["is_turbo"] is True


def test_an_xl_model_downloads_converts_loads_and_generates_through_the_worker(upstream_xl_repo, tmp_path,
                                                                               monkeypatch):
    import huggingface_hub
    from fastapi.testclient import TestClient

    from engine import memory, xl_timbre
    from entrypoints.bootstrap import build_app, build_backend, build_worker
    from service.config import Settings

    checkpoints = tmp_path / "checkpoints"
    build_tiny_checkpoint(checkpoints / XL_SFT)  # diffusers layout, as ACE-Step/acestep-v15-xl-sft-diffusers
    hub = FakeHub({UPSTREAM_XL_REPO: upstream_xl_repo})
    monkeypatch.setattr(model_sources, "hub_repo_files", hub.files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("ACESTEP_HF_REPO_ACESTEP_V15_XL_TURBO", UPSTREAM_XL_REPO)
    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(checkpoints), config_path=XL_TURBO,
                        config_path2=XL_SFT, init_llm="false", allow_download=True, demo_if_missing=False,
                        dtype="float32", warmup="false", pipeline=False)
    backend = build_backend(settings)
    worker = build_worker(settings, backend=backend)

    # the whole repo landed in the model's folder, its bundled vae/ and text encoder inside it, and was converted
    assert [s[0] for s in hub.snapshots] == [UPSTREAM_XL_REPO]
    assert (checkpoints / XL_TURBO / "vae" / "config.json").is_file() and not (checkpoints / "vae").exists()
    engine = worker.engine
    turbo, sft = engine.model(XL_TURBO), engine.model(XL_SFT)
    assert turbo.info.path == str(checkpoints / ".diffusers" / XL_TURBO)
    for model in (turbo, sft):
        pipe = model.pipe
        assert pipe.transformer.config.hidden_size == 96
        assert pipe.transformer.config.encoder_hidden_size == pipe.condition_encoder.config.hidden_size == 64
        assert tuple(pipe.transformer.condition_embedder.weight.shape) == (96, 64)
        # the timbre encoder pools its special token, as upstream's XL code does (engine/xl_timbre.py)
        assert xl_timbre.is_installed(pipe.condition_encoder.timbre_encoder)
        # the fit check's estimate counts the XL transformer at its own (wider) size
        path = Path(model.info.path)
        others = [p.name for p in path.iterdir() if p.is_dir() and p.name != "transformer"]
        assert memory.weight_bytes(path, "float32", skip_components=others) == \
            sum(t.numel() * 4 for t in pipe.transformer.state_dict().values())
    assert turbo.info.task_types == ("text2music", "cover", "repaint")  # as the 2B turbo
    assert len(sft.info.task_types) == 6 and turbo.info.random_weights and sft.info.random_weights

    client = TestClient(build_app(settings, backend))
    backend.store.record_heartbeat(worker.heartbeat())
    tasks = {}
    for model in (XL_TURBO, XL_SFT):
        r = client.post("/release_task", json={**TASK, "model": model})
        assert r.status_code == 200, r.text
        tasks[model] = r.json()["data"]["task_id"]
    while worker.run_once(0.0):
        pass
    for model, task_id in tasks.items():
        record = backend.store.get(task_id)
        assert record.status == "succeeded", record.error
        info = record.result.generation_info
        assert info["random_weights"] is True
        ignored = any("guidance_scale ignored" in note for note in info["notes"])
        assert ignored is (model == XL_TURBO), info["notes"]  # turbo: guidance-distilled, as the 2B turbo
        audio = backend.blobs.get(record.result.audios[0].key)
        assert sf.info(io.BytesIO(audio)).duration == 10.0


def test_an_xl_folder_from_upstreams_downloader_is_found_and_served(upstream_xl_repo, tmp_path):
    """Upstream's downloader snapshots the XL repo into checkpoints/<name>/: no shared vae/ beside it."""
    from engine.weights.checkpoints import local_layout

    dit = tmp_path / XL_TURBO
    for path, data in upstream_xl_repo.items():
        (dit / path).parent.mkdir(parents=True, exist_ok=True)
        (dit / path).write_bytes(data)
    assert local_layout(tmp_path, XL_TURBO) == "original"
    assert original_layout.shared_dir(tmp_path, XL_TURBO, "vae") == dit / "vae"
    shutil.rmtree(dit / original_layout.TEXT_ENCODER_DIR)
    assert local_layout(tmp_path, XL_TURBO) is None
    assert any(original_layout.TEXT_ENCODER_DIR in part for part in original_layout.missing_parts(tmp_path, XL_TURBO))
