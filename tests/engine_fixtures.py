"""Shared fixtures for the engine tests: two tiny random-weight checkpoints, built once per session, loaded
through the real `AceStepPipeline.from_pretrained` path.

Import the fixtures into a test module with `from tests.engine_fixtures import *  # noqa: F401,F403`.
"""
from __future__ import annotations

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

TURBO = "acestep-v15-turbo"
BASE = "acestep-v15-base"
HOP = 1920  # VAE hop in samples at 48 kHz (one 25 Hz latent frame)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    from engine.weights.checkpoints import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    for name in (TURBO, BASE):
        build_tiny_checkpoint(root / name, seed=0, model_name=name)
    return root


@pytest.fixture(scope="session")
def engine(tiny_checkpoint_dir):
    from engine.config import EngineConfig
    from engine.service import Engine

    # float32 pinned: auto picks bf16 on CPUs with AMX/AVX512-BF16, and the tests' numbers must not depend on
    # the machine they run on (tests/test_engine_cpu.py covers auto on both kinds of CPU)
    return Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO, BASE],
                                    allow_download=False, dtype="float32"))


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """(samples [frames, channels], sample_rate) of encoded audio."""
    samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, sr


def wav_bytes(seconds: float, sample_rate: int = 48000, channels: int = 2, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32")
    data = np.stack([tone] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="session")
def source_wav():
    """12 s of 44.1 kHz mono audio: exercises resampling and mono->stereo on the way in."""
    return wav_bytes(12.0, sample_rate=44100, channels=1)


__all__ = ["tiny_checkpoint_dir", "engine", "source_wav", "decode", "wav_bytes", "TURBO", "BASE", "HOP"]
