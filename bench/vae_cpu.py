"""Full-size VAE decode on CPU: wall, CPU-seconds and peak working set per song length and dtype.

Builds the published ACE-Step 1.5 Oobleck VAE (engine/published_configs.py) with RANDOM weights (speed and
memory do not depend on the values), and decodes a random latent of each length in a fresh child process,
so each row's peak RSS is its own: working set = peak RSS during the decode - RSS once the VAE is loaded.
The per-second fit (least squares over the lengths) is what engine/memory.py's decode estimate uses.

    .venv/bin/python bench/vae_cpu.py --durations 10 30 60 --dtypes bfloat16 float32 --fold both

Each child runs with OMP_WAIT_POLICY=PASSIVE (as the worker does) unless the caller set a policy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cpu_target import passive_omp_wait_policy  # noqa: E402  (torch-free)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start VmHWM (the peak RSS) again from now: building the model peaks higher than the decode."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(seconds: float, dtype_name: str, fold: bool) -> dict:
    import torch
    from diffusers import AutoencoderOobleck

    from engine.published_configs import VAE

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    vae = AutoencoderOobleck(**VAE).to(dtype).eval()
    if fold:  # fold weight norm into plain weights (it is recomputed on every call otherwise)
        fold_weight_norm(vae)
    frames = round(seconds * 25)
    z = torch.randn(1, VAE["decoder_input_channels"], frames, dtype=dtype)
    with torch.inference_mode():
        vae.decode(torch.randn(1, VAE["decoder_input_channels"], 8, dtype=dtype))  # first-call set-up
    base = rss_bytes()
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        audio = vae.decode(z).sample
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_bytes()
    return {"seconds": seconds, "dtype": dtype_name, "fold_weight_norm": fold, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "working_set_gib": round((peak - base) / 2**30, 3),
            "peak_rss_gib": round(peak / 2**30, 3), "samples": int(audio.shape[-1]),
            "threads": torch.get_num_threads()}


def fold_weight_norm(module) -> int:
    """Fold weight normalisation into plain weights for inference (torch.nn.utils.weight_norm recomputes
    g * v / |v| before every call of every convolution); returns how many modules were folded."""
    import torch
    from torch.nn.utils.weight_norm import WeightNorm

    folded = 0
    for sub in module.modules():
        if any(isinstance(h, WeightNorm) for h in sub._forward_pre_hooks.values()):
            torch.nn.utils.remove_weight_norm(sub)
            folded += 1
    return folded


def fit_per_second(rows: list[dict]) -> tuple[float, float]:
    """Least-squares working set = a + b * seconds, in GiB."""
    xs, ys = [r["seconds"] for r in rows], [r["working_set_gib"] for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
    return my - b * mx, b


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--fold", choices=["no", "yes", "both"], default="no")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(float(args.child[0]), args.child[1], args.child[2] == "yes")))
        return
    folds = {"no": ["no"], "yes": ["yes"], "both": ["no", "yes"]}[args.fold]
    rows = []
    for dtype in args.dtypes:
        for fold in folds:
            for seconds in args.durations:
                env = dict(os.environ)
                passive_omp_wait_policy(env)  # as the worker runs
                out = subprocess.run([sys.executable, __file__, "--child", str(seconds), dtype, fold],
                                     check=True, capture_output=True, text=True, env=env).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    from engine import memory

    print("\n| song | dtype | fold wn | wall s | CPU-s | working set GiB | engine estimate GiB | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        estimate = memory.vae_decode_bytes(1, r["seconds"], 128, 2 if r["dtype"] == "bfloat16" else 4) / memory.GB
        print(f"| {r['seconds']:g} s | {r['dtype']} | {r['fold_weight_norm']} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['working_set_gib']} | {estimate:.2f} | {r['peak_rss_gib']} |")
    for dtype in args.dtypes:
        for fold in folds:
            sel = [r for r in rows if r["dtype"] == dtype and r["fold_weight_norm"] == (fold == "yes")]
            if len(sel) >= 2:
                a, b = fit_per_second(sel)
                print(f"fit {dtype} fold={fold}: working set ~ {a:.3f} + {b:.4f} GiB/s of song (per item)")


if __name__ == "__main__":
    main()
