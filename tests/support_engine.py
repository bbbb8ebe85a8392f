"""A minimal engine for API tests: a deterministic sine tone per seed, clearly labelled.

It implements the GenerationEngine port the worker uses (service/ports.py) without torch: each audio file is a sine whose pitch depends on the seed,
of the requested duration, encoded with soundfile in the requested format. Every result says
`random_weights: True, test_engine: True`. It stands in for the real engine in API tests (the
real engine's tiny model is tested end to end elsewhere).

A prompt containing "PLEASE FAIL" makes generate() raise GenerationError (a failed task).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

import numpy as np

from engine import device_probe
from engine.audio_encode import encode_audio
from engine.request import GenerationRequest
from engine.types import (DeviceReport, EncodedAudio, EngineInfo, GenerationError, GenerationInfo, GenerationResult, Metas, ModelInfo,
                          ProgressCallback)

SAMPLE_RATE = 16000
DEFAULT_DURATION = 10.0
FAIL_MARKER = "PLEASE FAIL"


def tone(seed: int, duration: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The same seed always gives the same samples: 200-999 Hz, quiet, mono."""
    freq = 200 + seed % 800
    t = np.arange(int(round(sample_rate * duration))) / sample_rate
    return (0.2 * np.sin(2 * np.pi * freq * t)).astype("float32")


def encode(samples: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono samples in `fmt`, by the worker's own encoder (torch-free)."""
    return encode_audio(samples[None], fmt, sample_rate)


_encode = encode  # generate's `encode` flag shadows the name


class SineEngine:
    lm_loaded = False

    def __init__(self, model_names: Optional[list[str]] = None):
        self.model_names = list(model_names or ["acestep-v15-turbo"])
        self.calls: list[dict] = []  # what each generate() got (request + input audio sizes)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name, i == 0, random_weights=True, task_types=("text2music", "cover", "repaint"))
                for i, name in enumerate(self.model_names)]

    def describe(self) -> EngineInfo:
        return {"device": "cpu", "dtype": "float32", "lm_model": "none", "random_weights": True,
                "test_engine": True, "quantization": {"dit": "none", "lm": "none"}}

    def devices(self) -> DeviceReport:
        return device_probe.report("cpu", self.model_names, "float32")  # it computes on the CPU

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None,
                 progress: Optional[ProgressCallback] = None, encode: bool = True) -> GenerationResult:
        self.calls.append({"request": request, "src_audio": src_audio, "reference_audio": reference_audio})
        if FAIL_MARKER in request.prompt:
            raise GenerationError("the test engine was asked to fail")
        progress = progress or (lambda fraction, stage: None)
        progress(0.5, "Generating music (test engine)...")
        duration = float(request.audio_duration or DEFAULT_DURATION)
        given = list(request.seeds or [])
        seeds = [given[i] if i < len(given) else random.randrange(2**31) for i in range(request.batch_size)]
        audios = [EncodedAudio(_encode(tone(seed, duration), request.audio_format), request.audio_format,
                               SAMPLE_RATE, 1, duration, seed) for seed in seeds]
        progress(1.0, "Decoding audio...")
        model = request.model or self.model_names[0]
        metas = Metas(bpm=request.bpm, duration=duration, key_scale=request.key_scale or None,
                      time_signature=request.time_signature or None)
        info: GenerationInfo = {"random_weights": True, "test_engine": True, "steps": request.inference_steps,
                "task_type": request.task_type}
        return GenerationResult(audios=audios, metas=metas, dit_model=model, lm_model="none",
                                generation_info=info)

    def generate_batch(self, items: list[tuple[GenerationRequest, dict]],
                       progress: Optional[ProgressCallback] = None, encode: bool = True) -> list:
        out: list = []
        for request, audio in items:
            try:
                out.append(self.generate(request, src_audio=(audio or {}).get("src_audio"),
                                         reference_audio=(audio or {}).get("reference_audio"),
                                         progress=progress))
            except Exception as exc:  # the worker expects per-item exceptions
                out.append(exc)
        return out


class BloatedEngine(SineEngine):
    """Results larger than a DynamoDB item may hold (400 KB): long LM notes and genres."""

    def generate(self, request, **kw):
        result = super().generate(request, **kw)
        result.generation_info["notes"] = [f"note {i} " + "🎼" * 250 for i in range(300)]  # ~300 KB
        result.metas.genres = "ambient " * 20000  # ~160 KB
        return result


if TYPE_CHECKING:  # mypy (`make test`) holds the stand-in to the port the worker uses
    from service.ports import GenerationEngine

    def _is_generation_engine(engine: SineEngine) -> GenerationEngine:
        return engine
