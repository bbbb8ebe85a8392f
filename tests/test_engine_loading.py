"""Engine loading: the real from_pretrained path, model info, component sharing, missing models, demo mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.weights.checkpoints import (
    DEMO_MARKER,
    ModelNotFound,
    build_tiny_checkpoint,
    is_complete,
    resolve_model,
    supported_task_types,
)
from engine.config import EngineConfig
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import BASE, TURBO

REPO = Path(__file__).resolve().parents[1]


def test_tiny_checkpoint_has_the_published_layout(tiny_checkpoint_dir):
    model = tiny_checkpoint_dir / TURBO
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "AceStepPipeline"
    for comp in ("transformer", "condition_encoder", "vae", "text_encoder", "tokenizer", "scheduler",
                 "audio_tokenizer", "audio_token_detokenizer"):
        assert comp in index, comp
        assert (model / comp).is_dir(), comp
    marker = json.loads((model / DEMO_MARKER).read_text())
    assert marker["random_weights"] is True
    assert "noise" in marker["notice"]


def test_engine_loads_models_through_from_pretrained(engine):
    from diffusers import AceStepPipeline

    infos = {m.name: m for m in engine.models()}
    assert list(infos) == [TURBO, BASE]
    assert infos[TURBO].is_default and not infos[BASE].is_default
    assert all(m.random_weights for m in infos.values())
    assert isinstance(engine.model(TURBO).pipe, AceStepPipeline)
    assert engine.model(TURBO).pipe.is_turbo and not engine.model(BASE).pipe.is_turbo
    assert infos[TURBO].task_types == ("text2music", "cover", "repaint")
    assert set(infos[BASE].task_types) == {"text2music", "cover", "repaint", "lego", "extract", "complete"}


def test_variants_share_identical_components_and_keep_their_own_dit(engine):
    turbo, base = engine.model(TURBO).pipe, engine.model(BASE).pipe
    for comp in ("vae", "text_encoder", "tokenizer", "condition_encoder", "audio_tokenizer",
                 "audio_token_detokenizer"):
        assert getattr(turbo, comp) is getattr(base, comp), comp
    assert turbo.transformer is not base.transformer
    assert engine.describe()["shared_components"]["vae"] == [TURBO, BASE]


def test_different_component_files_are_not_shared(tmp_path):
    from engine.weights.checkpoints import build_tiny_checkpoint
    from engine.service import Engine

    build_tiny_checkpoint(tmp_path / TURBO, seed=0)
    build_tiny_checkpoint(tmp_path / BASE, seed=1)  # other seed: every component differs
    eng = Engine.load(EngineConfig(checkpoint_dir=str(tmp_path), model_names=[TURBO, BASE], allow_download=False))
    assert eng.model(TURBO).pipe.vae is not eng.model(BASE).pipe.vae
    # the char tokenizer has no weights, so its files are identical whatever the seed: that one is shared
    assert eng.describe()["shared_components"] == {"tokenizer": [TURBO, BASE]}


def test_one_model_hashes_no_component_and_two_keep_their_hashes_for_the_next_start(engine, tiny_checkpoint_dir,
                                                                                   monkeypatch):
    import engine.service as service
    from engine.service import Engine
    from engine.weights import fingerprint
    from engine.weights.checkpoints import SHAREABLE_COMPONENTS

    calls = []
    monkeypatch.setattr(service, "component_fingerprint", lambda path: calls.append(path))
    Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO], allow_download=False))
    assert calls == []  # nothing to share with: no file hashed
    # the two-model load (the engine fixture) left each component's file hashes beside it: a new process reads none
    monkeypatch.setattr(fingerprint, "_HASH_CACHE", {})
    monkeypatch.setattr(fingerprint, "hash_file", lambda file: pytest.fail(f"{file} was read again"))
    for comp in SHAREABLE_COMPONENTS:
        assert fingerprint.component_fingerprint(tiny_checkpoint_dir / TURBO / comp)
        assert fingerprint.sidecar_path(tiny_checkpoint_dir / TURBO / comp).is_file()


def test_describe_labels_random_weights(engine):
    d = engine.describe()
    assert d["device"] == "cpu" and d["dtype"] == "float32"
    assert d["random_weights"] is True
    assert "noise" in d["notice"]
    assert [m["name"] for m in d["models"]] == [TURBO, BASE]
    json.dumps(d)  # /health serialises it


def test_missing_model_offline_says_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = EngineConfig(checkpoint_dir=str(tmp_path), model_names=["acestep-v15-sft"], allow_download=True)
    with pytest.raises(ModelNotFound) as err:
        resolve_model(config, "acestep-v15-sft")
    msg = str(err.value)
    assert "acestep-v15-sft" in msg
    assert str(tmp_path / "acestep-v15-sft" / "model_index.json") in msg
    assert "original-layout" in msg and "Qwen3-Embedding-0.6B/" in msg  # the other layout it would have taken
    assert "HF_HUB_OFFLINE" in msg
    assert "acestep-models download acestep-v15-sft" in msg
    assert "acestep-models make-tiny" in msg
    assert "ACESTEP_HF_REPO_ACESTEP_V15_SFT" in msg


def test_engine_load_fails_clearly_when_a_model_is_missing(tmp_path):
    from engine.service import Engine

    with pytest.raises(ModelNotFound, match="ACESTEP_ALLOW_DOWNLOAD=false"):
        Engine.load(EngineConfig(checkpoint_dir=str(tmp_path), model_names=["nope"], allow_download=False))


def test_offline_start_builds_the_demo_beside_the_real_folder_never_in_it(tmp_path, monkeypatch, caplog):
    from engine.weights.demo_models import plan_start

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = EngineConfig(checkpoint_dir=str(tmp_path), model_names=[TURBO])
    with caplog.at_level("WARNING"):
        plan = plan_start(config)
    assert (plan.demo, plan.retry, config.demo_models) == ([TURBO], [], [TURBO])  # offline: nothing to retry
    assert is_complete(tmp_path / ".demo" / TURBO) and not (tmp_path / TURBO).exists()
    assert "RANDOM-WEIGHT" in caplog.text
    assert resolve_model(config, TURBO) == tmp_path / ".demo" / TURBO
    # real weights put in the model's own folder (no marker) win at once: no demo, nothing built
    build_tiny_checkpoint(tmp_path / TURBO)
    (tmp_path / TURBO / DEMO_MARKER).unlink()
    config = EngineConfig(checkpoint_dir=str(tmp_path), model_names=[TURBO])
    assert plan_start(config).demo == [] and resolve_model(config, TURBO) == tmp_path / TURBO


def test_a_first_start_with_network_waits_for_the_download_instead_of_a_demo(tmp_path, monkeypatch):
    from engine.weights.demo_models import plan_start

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = EngineConfig(checkpoint_dir=str(tmp_path), model_names=[TURBO], allow_download=True)
    assert plan_start(config).demo == []
    assert not (tmp_path / TURBO).exists() and not (tmp_path / ".demo").exists()


def test_task_type_rule():
    assert supported_task_types("acestep-v15-turbo") == ("text2music", "cover", "repaint")
    assert "lego" in supported_task_types("acestep-v15-sft")
    assert supported_task_types("x", is_turbo=True) == ("text2music", "cover", "repaint")
    assert supported_task_types("x-turbo", {"task_types": ["text2music"]}) == ("text2music",)


def test_config_from_env():
    env = {"ACESTEP_CONFIG_PATH": "/models/acestep-v15-turbo/", "ACESTEP_CONFIG_PATH2": "acestep-v15-base",
           "ACESTEP_CONFIG_PATH3": "", "ACESTEP_CHECKPOINT_DIR": "/ck", "ACESTEP_DEVICE": "cpu",
           "ACESTEP_ALLOW_DOWNLOAD": "false", "ACESTEP_LM_MODEL_PATH": "acestep-5Hz-lm-0.6B"}
    c = EngineConfig.from_env(env)
    assert c.model_names == ["acestep-v15-turbo", "acestep-v15-base"]
    assert c.default_model == "acestep-v15-turbo"
    assert (c.checkpoint_dir, c.device, c.allow_download, c.lm_model) == ("/ck", "cpu", False, "acestep-5Hz-lm-0.6B")
    assert EngineConfig.from_env({}).model_names == ["acestep-v15-turbo"]
    assert not EngineConfig(allow_download=True).downloads_possible({"HF_HUB_OFFLINE": "1"})


def test_importing_engine_contracts_does_not_import_torch():
    code = ("import sys, engine, engine.request, engine.types, engine.config, engine.weights.checkpoints, engine.plan; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_engine_never_imports_the_service_layers():
    forbidden = ("fastapi", "boto3", "mangum", "handlers", "service")
    for path in (REPO / "engine").glob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                module = stripped.split()[1].split(".")[0]
                assert module not in forbidden, f"{path.name}: {stripped}"


def test_models_cli_make_tiny_and_list(tmp_path, capsys, monkeypatch):
    from entrypoints.models import main

    monkeypatch.chdir(tmp_path)  # `list` loads ./.env into os.environ for good: none in a fresh folder
    monkeypatch.setenv("ACESTEP_CONFIG_PATH", "acestep-v15-base")
    assert main(["make-tiny", str(tmp_path), "--name", "acestep-v15-base"]) == 0
    assert is_complete(tmp_path / "acestep-v15-base")
    assert main(["list", "--checkpoint-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "acestep-v15-base" in out and "DEMO" in out
