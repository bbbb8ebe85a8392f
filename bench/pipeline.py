"""Worker throughput with and without the pipeline (ACESTEP_PIPELINE), through the real worker.

For each song length and batch size, the same tasks run twice, back to back on the same loaded engine:
  * sequential -- ACESTEP_PIPELINE=false: generate, VAE decode, encode (the engine's threads), store,
                  record, then the next task;
  * pipelined  -- ACESTEP_PIPELINE=true: encoding (encoder processes, one per core but one), storing and
                  recording run in the post-processing stage while the engine generates the next task.
Each run submits --tasks tasks of that batch size (batching across tasks off, so each task is one engine
call) to a fresh embedded backend (SQLite + files) and drains the worker; the figure is audio seconds
produced per wall second. The two modes alternate within a configuration, so the ratio compares runs
seconds apart on the same machine: on a shared machine read the ratio, not the absolute numbers.

Default: the tiny random-weight demo model on CPU (its audio is noise; its DiT is cheap, so encoding
weighs more than it would next to a real DiT). Run it as a script (`python bench/pipeline.py`): the encoder
processes are spawned and re-import this module.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import loadavg  # noqa: E402

PROMPT = "upbeat synth pop, female vocals, 120 bpm"
LYRICS = "[verse]\nneon lights across the city\n[chorus]\nwe keep on running through the night"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--durations", type=float, nargs="+", default=[30.0, 240.0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tasks", type=int, default=3, help="tasks per run (the pipeline overlaps task N+1 with N)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per mode and configuration (best is kept)")
    p.add_argument("--format", default="mp3", choices=["mp3", "wav", "flac"])
    p.add_argument("--encode-processes", type=int, default=0, help="0: one per core but one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--full-size", action="store_true", help="published ACE-Step 1.5 shapes (for a GPU)")
    return p.parse_args(argv)


def load_engine(args, root: Path):
    from engine.weights.checkpoints import build_tiny_checkpoint
    from engine.config import EngineConfig
    from engine.service import Engine

    name = "acestep-v15-turbo"
    build_tiny_checkpoint(root / "checkpoints" / name, seed=0, model_name=name,
                          size="full" if args.full_size else "tiny")
    return Engine.load(EngineConfig(checkpoint_dir=str(root / "checkpoints"), model_names=[name],
                                    device=args.device, allow_download=False))


def run(engine, encoder, args, root: Path, duration: float, batch: int, pipelined: bool, seed0: int) -> float:
    """Submit the tasks, run the worker until they are recorded; returns the wall seconds."""
    from engine.request import GenerationRequest
    from service.config import Settings
    from service.embedded import make_embedded_backend
    from service.records import SUCCEEDED
    from service.submission import submit_task
    from service.worker import Worker

    data = Path(tempfile.mkdtemp(prefix="data-", dir=root))
    settings = Settings(data_dir=str(data), pipeline=pipelined, batch_compatible_tasks=False, min_free_mb=0)
    backend = make_embedded_backend(settings)
    ids = []
    for t in range(args.tasks):
        request = GenerationRequest(prompt=PROMPT, lyrics=LYRICS, audio_duration=duration, batch_size=batch,
                                    seeds=[seed0 + 10 * t + i for i in range(batch)], inference_steps=args.steps,
                                    audio_format=args.format, bpm=120)
        ids.append(submit_task(backend, request, args.tasks)[0])
    worker = Worker(settings, backend, engine, encoder=encoder if pipelined else None)
    t0 = time.perf_counter()
    while worker.run_once(0, overlap=True):
        pass
    worker.close()  # drains the post-processing stage
    wall = time.perf_counter() - t0
    records = backend.store.get_many(ids)
    failed = [r.error for r in records.values() if r.status != SUCCEEDED]
    assert not failed and len(records) == len(ids), failed
    return wall


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from engine.encoder_pool import EncoderPool

    root = Path(tempfile.mkdtemp(prefix="acestep-bench-pipeline-"))
    engine = load_engine(args, root)
    encoder = EncoderPool(args.encode_processes)
    encoder.warm_up()
    print(f"# Worker pipeline benchmark ({'full-size' if args.full_size else 'tiny'} random-weight model; "
          f"the audio is noise)")
    print(f"device {engine.device}, torch {torch.__version__}, {os.cpu_count()} CPU threads, {platform.machine()}, "
          f"{encoder.processes} encoder process(es); {args.steps} steps, {args.format}, {args.tasks} tasks per run, "
          f"best of {args.repeats}")
    print(f"load average before: {loadavg()}")
    print("other processes using CPU at the start:\n" + _busy_processes())
    _warm(engine, encoder, args)
    print("| song | batch | tasks | audio s | sequential s | pipelined s | sequential audio-s/s | pipelined audio-s/s "
          "| pipelined / sequential |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for duration in args.durations:
        for batch in args.batches:
            seq, pipe = [], []
            for r in range(args.repeats):
                order = (False, True) if r % 2 == 0 else (True, False)  # alternate who goes first
                for pipelined in order:
                    wall = run(engine, encoder, args, root, duration, batch, pipelined, seed0=1000)
                    (pipe if pipelined else seq).append(wall)
            audio = args.tasks * batch * duration
            s, p = min(seq), min(pipe)
            print(f"| {duration:g} s | {batch} | {args.tasks} | {audio:g} | {s:.1f} | {p:.1f} | {audio / s:.1f} "
                  f"| {audio / p:.1f} | {s / p:.2f}x |", flush=True)
    encoder.close()
    shown = sys.argv[1:] if argv is None else argv
    print(f"\nload average after: {loadavg()}")
    print("Reproduce: `nice -n 5 .venv/bin/python bench/pipeline.py" + "".join(" " + a for a in shown) + "`")
    return 0


def _warm(engine, encoder, args) -> None:
    """One short task through each mode first (kernels, allocator, encoder processes), not timed."""
    import shutil

    root = Path(tempfile.mkdtemp(prefix="acestep-bench-warm-"))
    saved, args.tasks = args.tasks, 1
    try:
        for pipelined in (False, True):
            run(engine, encoder, args, root, 10.0, 1, pipelined, seed0=1)
    finally:
        args.tasks = saved
        shutil.rmtree(root, ignore_errors=True)


def _busy_processes() -> str:
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:7]
    except (OSError, subprocess.SubprocessError):
        return "  (ps not available)"
    return "\n".join("  " + line.strip()[:140] for line in out)


if __name__ == "__main__":
    sys.exit(main())
