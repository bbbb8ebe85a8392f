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
