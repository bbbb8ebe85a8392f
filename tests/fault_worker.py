"""A real Worker (real loop, real embedded backend) over a fast fake engine, as a process to kill -9.

    python -m tests.fault_worker <data dir> <visibility timeout>

The engine decodes every source it is given through engine.audio_io (the hostile-input path) and
returns a tiny WAV, so thousands of tasks run in seconds. Used by the soak test (tests/test_soak.py).
"""
from __future__ import annotations

import io
import os
import sys
from typing import Optional

import numpy as np
import soundfile as sf

from engine import audio_io
from engine.request import GenerationRequest
from engine.types import EncodedAudio, GenerationResult, ModelInfo, ProgressCallback
from service.config import Settings
from service.embedded import make_embedded_backend
from service.worker import Worker

_WAV = io.BytesIO()
sf.write(_WAV, np.zeros((80, 2), dtype="float32"), 8000, format="WAV")


class FastEngine:
    lm_loaded = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("fast", True, random_weights=True, task_types=("text2music", "cover"))]

    def describe(self) -> dict:
        return {"device": "cpu", "dtype": "float32", "lm_model": "none"}

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None, progress: Optional[ProgressCallback] = None) -> GenerationResult:
        if src_audio is not None:
            audio_io.decode_audio(src_audio, "src_audio")
        if progress:
            progress(0.5, "dit")
        audios = [EncodedAudio(_WAV.getvalue(), "wav", 8000, 2, 0.01, i) for i in range(request.batch_size)]
        return GenerationResult(audios, metas={}, dit_model="fast", lm_model="none", generation_info={})

    def generate_batch(self, items, progress=None) -> list:
        return [self.generate(r, src_audio=a.get("src_audio"), progress=progress) for r, a in items]


def main() -> None:
    data_dir, visibility = sys.argv[1], float(sys.argv[2])
    settings = Settings(data_dir=data_dir, visibility_timeout=visibility, min_free_mb=0)
    worker = Worker(settings, make_embedded_backend(settings), FastEngine())
    with open(os.path.join(data_dir, f"ready-{os.getpid()}"), "w"):
        pass  # the soak kills only workers that got this far (imports can take long on a busy machine)
    worker.run_forever(poll_seconds=0.2)


if __name__ == "__main__":
    main()
