"""The worker's scripted stand-in engine and a submit helper, shared by the worker and fault tests.

The scripted engine makes real (sine) audio so results decode; its hooks let a test block, fail or
observe a generation.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import soundfile as sf

from engine import device_probe
from engine.request import GenerationRequest
from engine.types import (DeviceReport, EncodedAudio, EngineInfo, GenerationInfo, GenerationResult, Metas, ModelInfo, PendingAudio,
                          ProgressCallback)
from service.submission import submit_task

BAD_SEED = 666


class ScriptedEngine:
    lm_loaded = False

    def __init__(self) -> None:
        self.calls: list[list[GenerationRequest]] = []
        self.before_generate: Optional[Callable[[ProgressCallback], object]] = None  # run inside generate
        self.error: Exception | None = None
        self.defer = False  # with encode=False, return unencoded audio for the worker's encoder processes

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("test-model", True, random_weights=True, task_types=("text2music", "cover"))]

    def describe(self) -> EngineInfo:
        return {"device": "cpu", "dtype": "float32", "lm_model": "none"}

    def devices(self) -> DeviceReport:
        return device_probe.report("cpu", ["test-model"], "float32")

    def _audio(self, req: GenerationRequest, seed: int) -> EncodedAudio:
        sr, dur = 8000, req.audio_duration or 10.0
        t = np.arange(int(sr * dur)) / sr
        wave = 0.1 * np.sin(2 * np.pi * (220 + seed % 200) * t)
        buf = io.BytesIO()
        sf.write(buf, np.stack([wave, wave], 1), sr, format="WAV")
        return EncodedAudio(buf.getvalue(), "wav", sr, 2, dur, seed)

    def _pending(self, req: GenerationRequest, seed: int) -> PendingAudio:
        """Unencoded audio (defer mode): seed 666 makes samples the encoder refuses (NaN)."""
        sr, dur = 8000, req.audio_duration or 10.0
        t = np.arange(int(sr * dur)) / sr
        wave = (0.1 * np.sin(2 * np.pi * (220 + seed % 200) * t)).astype("float32")
        if seed == BAD_SEED:
            wave[0] = np.nan
        return PendingAudio(np.stack([wave, wave]), "wav", sr, 2, dur, seed)

    def _result(self, req: GenerationRequest, progress: ProgressCallback, encode: bool = True) -> GenerationResult:
        if self.before_generate:
            self.before_generate(progress)
        if self.error:
            raise self.error
        for step in range(4):
            progress((step + 1) / 4, "dit")
        seeds = req.seeds or [7]
        seeds = [seeds[i] if i < len(seeds) else seeds[0] + i for i in range(req.batch_size)]
        info: GenerationInfo = {"random_weights": True, "timings": {"audio_encoding_s": 0.0}}
        if self.defer and not encode:
            return GenerationResult([], metas=Metas(bpm=req.bpm), dit_model="test-model", lm_model="none",
                                    generation_info=info, pending=[self._pending(req, s) for s in seeds])
        return GenerationResult([self._audio(req, s) for s in seeds], metas=Metas(bpm=req.bpm),
                                dit_model="test-model", lm_model="none", generation_info=info)

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None,
                 progress: Optional[ProgressCallback] = None, encode: bool = True) -> GenerationResult:
        self.calls.append([request])
        return self._result(request, progress or (lambda f, s: None), encode)

    def generate_batch(self, items: list[tuple[GenerationRequest, dict]],
                       progress: Optional[ProgressCallback] = None, encode: bool = True) -> list:
        self.calls.append([r for r, _ in items])
        return [self._result(r, progress or (lambda f, s: None), encode) for r, _ in items]


if TYPE_CHECKING:  # mypy (`make test`) holds the stand-in to the port the worker uses
    from service.ports import GenerationEngine

    def _is_generation_engine(engine: ScriptedEngine) -> GenerationEngine:
        return engine


def submit(backend, max_queue=10, uploads=None, **fields):
    """Submit a small text2music task straight through the service (no HTTP); its id."""
    req = GenerationRequest(**{"audio_duration": 10, "batch_size": 1, **fields})
    task_id, _ = submit_task(backend, req, max_queue, uploads=uploads)
    return task_id
