"""A real Worker (real loop, real embedded backend) over a fast fake engine, as a process to kill -9.

    python -m tests.fault_worker <data dir> <visibility timeout>
    python -m tests.fault_worker --fork-server <data dir> <visibility timeout> [--format]

The engine decodes every source it is given through engine.audio_io (the hostile-input path) and
returns a tiny WAV, so thousands of tasks run in seconds. Used by the soak test (tests/test_soak.py).

With --fork-server the process imports everything once (torch, through audio_io, takes seconds,
and up to 30 s on a loaded machine) and forks a fresh worker process for each line read from
stdin, answering its pid. Each child is a separate process that opens its own backend and runs the
real worker loop, so `kill -9` of a child is a real worker crash; the soak then spends its time on
tasks and kills instead of on interpreter start-up. Children die with the server (PDEATHSIG) and
the server ends when stdin closes, so an interrupted test leaves nothing running. `--format` gives
the workers FormatStandIn, so the API sends them /format_input's tasks. Workers deliver webhooks as
`acestep-worker` wires them.
"""
from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
from typing import Optional

import numpy as np
import soundfile as sf

from engine import audio_io, device_probe
from engine.request import GenerationRequest
from entrypoints.bootstrap import build_webhooks
from engine.types import DeviceReport, EncodedAudio, EngineInfo, GenerationResult, Metas, ModelInfo, ProgressCallback
from service.config import load_settings
from service.embedded import make_embedded_backend
from service.worker import Worker

_WAV = io.BytesIO()
sf.write(_WAV, np.zeros((80, 2), dtype="float32"), 8000, format="WAV")


class FastEngine:
    lm_loaded = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("fast", True, random_weights=True, task_types=("text2music", "cover"))]

    def describe(self) -> EngineInfo:
        return {"device": "cpu", "dtype": "float32", "lm_model": "none"}

    def devices(self) -> DeviceReport:
        return device_probe.report("cpu", ["fast"], "float32")

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None, progress: Optional[ProgressCallback] = None,
                 encode: bool = True) -> GenerationResult:
        if src_audio is not None:
            audio_io.decode_audio(src_audio, "src_audio")
        if progress:
            progress(0.5, "dit")
        audios = [EncodedAudio(_WAV.getvalue(), "wav", 8000, 2, 0.01, i) for i in range(request.batch_size)]
        return GenerationResult(audios, metas=Metas(), dit_model="fast", lm_model="none", generation_info={})

    def generate_batch(self, items, progress=None, encode=True) -> list:
        return [self.generate(r, src_audio=a.get("src_audio"), progress=progress) for r, a in items]


class FormatStandIn(FastEngine):
    """FastEngine plus a stand-in for the 5 Hz LM's format mode (no LM runs: the caption comes back
    upper-cased, labelled as a test engine), so /format_input's tasks are queued and answered."""
    lm_loaded = True

    def describe(self) -> EngineInfo:
        return {"device": "cpu", "dtype": "float32", "lm_model": "format-stand-in (test engine, no LM)"}

    def generate(self, request: GenerationRequest, *, src_audio: Optional[bytes] = None,
                 reference_audio: Optional[bytes] = None, progress: Optional[ProgressCallback] = None,
                 encode: bool = True) -> GenerationResult:
        if not request.analysis_only:
            return super().generate(request, src_audio=src_audio, progress=progress)
        return GenerationResult([], metas=Metas(bpm=96, key_scale="A minor", time_signature="4"), dit_model="fast",
                                lm_model="format-stand-in", generation_info={
                                    "caption": request.prompt.upper(), "lyrics": request.lyrics,
                                    "test_engine": True, "random_weights": True})


def run_worker(data_dir: str, visibility: float, engine: Optional[FastEngine] = None) -> None:
    # the environment as `acestep-worker` reads it (the soak sets webhook and dead-letter settings there)
    settings = load_settings({"data_dir": data_dir, "visibility_timeout": visibility, "min_free_mb": 0},
                             dotenv_path=None)
    backend = make_embedded_backend(settings)
    webhooks = build_webhooks(settings, backend)  # as entrypoints/worker.py: deliveries survive a kill in the outbox
    worker = Worker(settings, backend, engine or FastEngine(), on_finished=webhooks.task_finished)
    with open(os.path.join(data_dir, f"ready-{os.getpid()}"), "w"):
        pass  # the soak kills only workers that got this far (imports can take long on a busy machine)
    worker.run_forever(poll_seconds=0.2)


_PR_SET_PDEATHSIG = 1


def _fork_worker(data_dir: str, visibility: float, engine: FastEngine) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: die with the fork server, then run an ordinary worker
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdin.close()
        run_worker(data_dir, visibility, engine)
    finally:
        os._exit(0)


def fork_server(data_dir: str, visibility: float, engine: FastEngine) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children killed by the soak are reaped by the kernel
    for _ in sys.stdin:
        print(_fork_worker(data_dir, visibility, engine), flush=True)


def main() -> None:
    if sys.argv[1] == "--fork-server":
        fork_server(sys.argv[2], float(sys.argv[3]), FormatStandIn() if "--format" in sys.argv[4:] else FastEngine())
    else:
        run_worker(sys.argv[1], float(sys.argv[2]))


if __name__ == "__main__":
    main()
