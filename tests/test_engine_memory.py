"""The GPU-fit check: weight sizes read from safetensors headers, and a refusal that gives numbers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.memory import GB, WORKSPACE_BYTES, check_fits, free_bytes, weight_bytes
from engine.types import GenerationError


def test_weight_bytes_follow_the_loading_dtype_and_skip_shared_components(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    save_file({"w": torch.zeros(1000, 10, dtype=torch.bfloat16), "step": torch.zeros(4, dtype=torch.int64)},
              str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"w": torch.zeros(500, dtype=torch.float32)}, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert weight_bytes(tmp_path, "bfloat16") == 10000 * 2 + 4 * 8 + 500 * 2
    assert weight_bytes(tmp_path, "float32") == 10000 * 4 + 4 * 8 + 500 * 4
    assert weight_bytes(tmp_path, "bfloat16", skip_components=["vae"]) == 10000 * 2 + 4 * 8


def test_a_model_that_does_not_fit_is_refused_with_numbers():
    with pytest.raises(GenerationError, match=r"needs about 20.0 GB .* cuda:0 has 16.0 GB free"):
        check_fits(20 * GB, 16 * GB, "cuda:0", "acestep-v15-xl-turbo")
    check_fits(6 * GB, 6 * GB + WORKSPACE_BYTES, "cuda:0", "acestep-v15-turbo")  # fits: no error
    check_fits(100 * GB, None, "cpu", "anything")  # CPU memory is not checked


def test_free_bytes_is_none_off_gpu():
    assert free_bytes(torch.device("cpu")) is None


def test_engine_refuses_at_load_when_the_models_do_not_fit(tmp_path, monkeypatch):
    """The device's free memory is the boundary: pretend a small GPU, and loading stops before any weights."""
    from engine import memory
    from engine.checkpoints import build_tiny_checkpoint
    from engine.config import EngineConfig
    from engine.service import Engine

    build_tiny_checkpoint(tmp_path / "acestep-v15-turbo")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1 * GB)
    config = EngineConfig(checkpoint_dir=str(tmp_path), model_names=["acestep-v15-turbo"], allow_download=False)
    with pytest.raises(GenerationError, match=r"acestep-v15-turbo needs about 0.0 GB for weights plus 4 GB"):
        Engine.load(config)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 8 * GB)
    assert [m.name for m in Engine.load(config).models()] == ["acestep-v15-turbo"]
