"""GPU benchmark, one command: full-size random-weight models per configuration (bf16, int8, offload), per-stage
timings and peak memory, written as JSON and a markdown table.

    .venv/bin/python bench/gpu.py                      # on a lent GPU: 2B turbo, 30 s and 240 s songs
    .venv/bin/python bench/gpu.py --device cpu --tiny  # the same path on tiny models (tests/test_bench_gpu.py)

For each configuration the engine is loaded from scratch (Engine.load: the real loading, fit check, quantisation
and offload paths), warmed up with one short song, then each song length runs once:
  bf16    -- ACESTEP_DTYPE=bfloat16, everything resident (float32 with --tiny on CPU);
  int8    -- + ACESTEP_QUANTIZE=int8 (torchao weight-only int8 of the DiT, engine/quantize.py);
  offload -- + ACESTEP_OFFLOAD=modules (engine/offload.py: only the running stage on the GPU).
Peak memory: torch.cuda.max_memory_allocated after the load and over each song (reset before each); on CPU the
process's peak RSS so far (ru_maxrss: it never goes down, so later rows read at least the earlier ones).
Random weights: the audio is noise; the timings and memory are those of the real shapes
(engine/published_configs.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 1 << 30
CONFIGS = {
    "bf16": {},
    "int8": {"quantize": "int8"},
    "offload": {"offload": "modules"},
}
STAGES = ("text_encoding_s", "condition_encoding_s", "dit_s", "vae_decode_s")  # engine/timing.py's stage timings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of the published shapes")
    p.add_argument("--model", default="acestep-v15-turbo")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--durations", type=float, nargs="+", default=[30.0, 240.0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up song (first-run costs then count)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="holds <model>/ already (else built once under --work-dir, or a temp dir)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default="bench/results/gpu", help="writes <out>.json and <out>.md")
    return p.parse_args(argv)


def checkpoint_dir(args) -> Path:
    from engine.weights.checkpoints import build_tiny_checkpoint, is_complete

    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="acestep-gpu-bench-")) / ("tiny" if args.tiny else "full")
    if not is_complete(root / args.model):
        build_tiny_checkpoint(root / args.model, seed=0, model_name=args.model, size="tiny" if args.tiny else "full")
    return root


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def run_config(name: str, args, root: Path) -> list[dict[str, Any]]:
    import torch

    from engine.config import EngineConfig
    from engine.request import GenerationRequest
    from engine.service import Engine

    dtype = "float32" if args.tiny and args.device == "cpu" else "bfloat16"
    config = EngineConfig(checkpoint_dir=str(root), model_names=[args.model], device=args.device, dtype=dtype,
                          allow_download=False, warmup="false", **CONFIGS[name])
    device = torch.device(args.device)
    reset_peak(device)
    t0 = time.perf_counter()
    engine = Engine.load(config)
    load_s, load_peak = time.perf_counter() - t0, peak_bytes(device)
    info = engine.describe()

    def song(seconds: float, seed: int):
        request = GenerationRequest(prompt="benchmark", lyrics="[instrumental]", audio_duration=seconds,
                                    inference_steps=args.steps, seeds=[seed], audio_format="wav")
        return engine.generate(request, encode=False)

    if not args.no_warmup:
        song(min(args.durations), 0)  # kernels, allocator, compilation
    rows = []
    for seconds in args.durations:
        reset_peak(device)
        t0 = time.perf_counter()
        result = song(seconds, 1)
        wall = time.perf_counter() - t0
        gi = result.generation_info
        timings = gi.get("timings", {})
        rows.append({
            "config": name, "song_s": seconds, "steps": args.steps, "wall_s": round(wall, 3),
            **{stage: timings.get(stage) for stage in STAGES},
            "pipeline_s": timings.get("pipeline_s"),
            "peak_gib": round(peak_bytes(device) / GiB, 3), "load_s": round(load_s, 2),
            "load_peak_gib": round(load_peak / GiB, 3), "dtype": info["dtype"],
            "quantization": info.get("quantization"), "offload": info.get("offload"),
            "vae_decode": gi.get("vae_decode"), "vae_decode_device": gi.get("vae_decode_device"),
            "random_weights": gi.get("random_weights"),
        })
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"GPU benchmark ({meta['size']} random-weight {meta['model']} -- the audio is noise) on {meta['device']}, "
             f"torch {meta['torch']}, {meta['steps']} steps; `{meta['command']}`", "",
             "| config | song | wall s | text enc s | cond enc s | DiT s | VAE dec s | peak GiB | load s "
             "| load peak GiB | VAE decode |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r["config"], f"{r['song_s']:g} s", f"{r['wall_s']:.2f}",
                 *("" if r[s] is None else f"{r[s]:.3f}" for s in STAGES),
                 f"{r['peak_gib']:.2f}", f"{r['load_s']:.1f}", f"{r['load_peak_gib']:.2f}",
                 f"{r['vae_decode']} on {r['vae_decode_device']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    root = checkpoint_dir(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    shown = sys.argv[1:] if argv is None else argv
    meta = {"device": f"{args.device} ({name})", "torch": torch.__version__, "model": args.model,
            "size": "tiny" if args.tiny else "full-size", "steps": args.steps,
            "command": "python bench/gpu.py" + "".join(" " + a for a in shown), "cpu_threads": os.cpu_count()}
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        rows.extend(run_config(config, args, root))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
