"""ACESTEP_LM_BACKEND picks the 5 Hz LM runtime: pt, vllm (strict) or auto (vLLM when installed, else pt with a
warning). vLLM itself runs in its own venv (tests/vllm); here its absence is the case under test."""
from __future__ import annotations

import logging
import sys

import pytest

from engine.config import EngineConfig
from engine.lm import backend_choice
from engine.lm.backend_choice import LMBackendUnavailable, resolve_backend
from engine.types import GenerationError


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setattr(backend_choice, "vllm_installed", lambda: False)


def test_pt_is_always_pt(monkeypatch):
    monkeypatch.setattr(backend_choice, "vllm_installed", lambda: True)
    assert resolve_backend("pt") == resolve_backend(" PT ") == "pt"


def test_vllm_when_installed(monkeypatch):
    monkeypatch.setattr(backend_choice, "vllm_installed", lambda: True)
    assert resolve_backend("vllm") == resolve_backend("auto") == resolve_backend(None) == "vllm"


def test_vllm_requested_but_missing_is_a_clear_error(no_vllm):
    with pytest.raises(LMBackendUnavailable, match="ACESTEP_LM_BACKEND=vllm but vLLM is not installed"):
        resolve_backend("vllm")


def test_auto_falls_back_to_pt_with_a_warning(no_vllm, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.lm"):
        assert resolve_backend("auto") == "pt"
    assert "vLLM is not installed" in caplog.text


def test_unknown_name_is_refused():
    with pytest.raises(LMBackendUnavailable, match="not one of pt, vllm, auto"):
        resolve_backend("mlx")


def test_setting_reaches_the_engine_config():
    assert EngineConfig.from_env({"ACESTEP_LM_BACKEND": "pt"}).lm_backend == "pt"
    assert EngineConfig.from_env({}).lm_backend == "auto"


def test_this_venv_has_no_vllm_and_nothing_imported_it():
    assert not backend_choice.vllm_installed() and "vllm" not in sys.modules


def test_the_worker_refuses_to_load_a_planner_on_a_missing_vllm(no_vllm, tmp_path):
    from engine import lm_bridge
    from engine.lm.tiny import build_tiny_lm

    build_tiny_lm(tmp_path / "lm", audio_codes=16)
    config = EngineConfig(checkpoint_dir=str(tmp_path), lm_model="lm", lm_backend="vllm", allow_download=False)
    with pytest.raises(GenerationError, match="vLLM is not installed"):
        lm_bridge.load_planner(config, "cpu")
    planner = lm_bridge.load_planner(EngineConfig(checkpoint_dir=str(tmp_path), lm_model="lm", lm_backend="auto",
                                                  allow_download=False), "cpu")
    assert planner.backend.name == "pt"
