"""Engine benchmark: seconds per task and per second of audio, stage split, and engine overhead.

For each song length (default 30 s and 240 s) and batch size (1 and 4), at 8 steps:
  * engine   -- Engine.generate(request) end to end (text encoding, DiT, VAE decode, audio encoding);
  * bare     -- the same AceStepPipeline object called directly with the same inputs and seeds (then moved to
                CPU); separately, the plain sequential soundfile encoding of each item;
  * many     -- (batch > 1) that many batch-1 tasks handed to Engine.generate_batch as one batch.
Engine overhead, two ways: the A/B ratio (engine wall time - its audio-encoding stage) / bare pipeline call - 1, and
the engine's own time (engine wall time - its pipeline call - its audio encoding, measured inside one run, so
immune to run-to-run noise) relative to the pipeline call. Both cover what the engine adds around
the pipeline (input planning, generators, hooks, RNG fork, trimming, result assembly). Audio encoding is compared on
its own (the engine encodes batch items in parallel threads). Each number is the best (minimum) of --repeats runs,
engine and bare alternating: on a shared machine, interference only ever adds time, so the minimum is the most
repeatable estimate of the cost itself.

Default: a tiny random-weight model on CPU (the numbers say how much the engine adds, not how fast ACE-Step is).
`--full-size --device cuda` builds random-weight models with the published ACE-Step 1.5 shapes
(engine/published_configs.py) for GPU timings. Random weights: the audio is noise.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "upbeat synth pop, female vocals, 120 bpm"
LYRICS = "[verse]\nneon lights across the city\n[chorus]\nwe keep on running through the night"
STAGES = (("text enc", ("text_encoding_s", "condition_encoding_s")), ("DiT", ("dit_s",)),
          ("VAE dec", ("vae_decode_s",)), ("audio enc", ("audio_encoding_s",)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true", help="published ACE-Step 1.5 shapes (for a GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--durations", type=float, nargs="+", default=[30.0, 240.0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--format", default="mp3", choices=["mp3", "wav", "flac"])
    p.add_argument("--model", default="acestep-v15-turbo")
    p.add_argument("--work-dir", default=None, help="where to build the checkpoint (default: a temp dir)")
    return p.parse_args(argv)


def build_engine(args):
    from engine.weights.checkpoints import build_tiny_checkpoint, is_complete
    from engine.config import EngineConfig
    from engine.service import Engine

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="acestep-bench-"))
    size = "full" if args.full_size else "tiny"
    path = root / f"{size}" / args.model
    t0 = time.perf_counter()
    if not is_complete(path):
        build_tiny_checkpoint(path, seed=0, model_name=args.model, size=size)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = Engine.load(EngineConfig(checkpoint_dir=str(path.parent), model_names=[args.model],
                                      device=args.device, dtype=args.dtype, allow_download=False))
    return engine, built, time.perf_counter() - t0


def request(args, duration, batch, seed0):
    from engine.request import GenerationRequest

    return GenerationRequest(prompt=PROMPT, lyrics=LYRICS, audio_duration=duration, batch_size=batch,
                             seeds=[seed0 + i for i in range(batch)], inference_steps=args.steps,
                             guidance_scale=1.0, audio_format=args.format, bpm=120)


def run_engine(engine, req):
    t0 = time.perf_counter()
    result = engine.generate(req)
    return time.perf_counter() - t0, result.generation_info["timings"]


def run_many(engine, reqs):
    t0 = time.perf_counter()
    results = engine.generate_batch([(r, {}) for r in reqs])
    assert all(not isinstance(r, Exception) for r in results), results
    return time.perf_counter() - t0


def run_bare(engine, req):
    """The same pipeline object, same inputs and per-item generators. Returns (pipeline s, sequential encode s)."""
    import torch

    from engine import audio_io

    pipe = engine.model(req.model).pipe
    n = req.batch_size
    pipe.vae.use_tiling = req.use_tiled_decode  # same VAE decode mode as the engine run
    t0 = time.perf_counter()
    audio = pipe(prompt=[req.prompt] * n, lyrics=[req.lyrics] * n, vocal_language=[req.vocal_language] * n,
                 audio_duration=req.audio_duration, num_inference_steps=req.inference_steps,
                 guidance_scale=req.guidance_scale, shift=req.shift, bpm=req.bpm,
                 generator=[torch.Generator("cpu").manual_seed(s) for s in req.seeds]).audios
    audio = audio.float().cpu().numpy()  # includes the device sync on CUDA
    pipeline_s = time.perf_counter() - t0
    target = round(req.audio_duration * audio_io.SAMPLE_RATE)
    t0 = time.perf_counter()
    for item in audio[..., :target]:
        audio_io.encode_audio(item, req.audio_format)
    return pipeline_s, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    engine, built_s, load_s = build_engine(args)
    d = engine.describe()
    print(f"# Engine benchmark ({'full-size' if args.full_size else 'tiny'} random-weight model -- the audio is noise)")
    print(f"device {d['device']} ({_device_name(engine.device)}), dtype {d['dtype']}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU threads, {platform.machine()}")
    print(f"checkpoint build {built_s:.1f} s, Engine.load {load_s:.2f} s; {args.steps} steps, "
          f"format {args.format}, best of {args.repeats} runs\n")
    print(f"load average before: {_loadavg()} (other processes on the machine skew CPU numbers)\n")
    run_engine(engine, request(args, min(args.durations), 1, 0))  # warm-up (kernels, allocator)
    run_bare(engine, request(args, min(args.durations), 1, 0))
    if args.full_size and engine.device.type == "cuda":
        _report_full_song(engine, args)

    header = ("| song | batch | mode | s/task | s/item | s per s of audio | text enc | DiT | VAE dec | audio enc "
              "| engine excl. audio enc | bare pipeline call | A/B overhead | engine's own time | own / pipeline "
              "| bare sequential enc |")
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for duration in args.durations:
        for batch in args.batches:
            req = request(args, duration, batch, 1000)
            engine_s, bare_s, bare_enc, stage_rows = [], [], [], []
            for _ in range(args.repeats):
                t, timings = run_engine(engine, req)
                engine_s.append(t)
                stage_rows.append(timings)
                p, enc = run_bare(engine, req)
                bare_s.append(p)
                bare_enc.append(enc)
            e, b = min(engine_s), min(bare_s)
            core = min(t - r["audio_encoding_s"] for t, r in zip(engine_s, stage_rows))
            stages = [min(sum(t.get(k, 0.0) for k in keys) for t in stage_rows) for _, keys in STAGES]
            # time the engine spends outside the pipeline call and the encoding, measured inside the same run:
            # immune to the run-to-run noise that the A/B difference suffers on a shared machine
            own = min(t - r["pipeline_s"] - r["audio_encoding_s"] for t, r in zip(engine_s, stage_rows))
            own_pct = min(100 * (t - r["pipeline_s"] - r["audio_encoding_s"]) / r["pipeline_s"]
                          for t, r in zip(engine_s, stage_rows))
            print(f"| {duration:g} s | {batch} | engine | {e:.3f} | {e / batch:.3f} | {e / (batch * duration):.4f} | "
                  + " | ".join(f"{s:.3f}" for s in stages)
                  + f" | {core:.3f} | {b:.3f} | {100 * (core / b - 1):+.1f}% | {own:.3f} | {own_pct:.2f}% "
                  f"| {min(bare_enc):.3f} |")
            if batch > 1:
                reqs = [request(args, duration, 1, 2000 + i) for i in range(batch)]
                many = min(run_many(engine, reqs) for _ in range(args.repeats))
                print(f"| {duration:g} s | {batch}x1 | generate_batch | {many / batch:.3f} | {many / batch:.3f} | "
                      f"{many / (batch * duration):.4f} | | | | | | | | | | |")
    print("\nColumns: s/task = wall time of one request (all its batch items); s/item = s/task / batch; stage "
          "columns = the engine's own per-stage timings; A/B overhead = (engine - its audio encoding) / "
          "bare pipeline call - 1 (two separate runs: noisy on a shared CPU); engine's own time = engine wall time "
          "- its pipeline call - its audio encoding, in the same run, and its ratio to the pipeline call; "
          "generate_batch rows: N batch-1 tasks batched into one call, time per task.")
    shown = sys.argv[1:] if argv is None else argv
    print("\nReproduce: `.venv/bin/python bench/engine.py" + "".join(" " + a for a in shown) + "`")
    print(f"load average during the run: {_loadavg()}")
    return 0


def _report_full_song(engine, args) -> None:
    """ACE-Step's published figure: a full song in under 2 s on an A100 (8 turbo steps)."""
    req = request(args, 240.0, 1, 7)
    t, timings = run_engine(engine, req)
    print(f"240 s song, batch 1, {args.steps} steps: {t:.2f} s end to end ({t - timings['audio_encoding_s']:.2f} s "
          f"without {args.format} encoding) on {_device_name(engine.device)}; published: < 2 s per full song on "
          f"an A100\n")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
