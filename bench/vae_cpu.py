"""Full-size VAE decode on CPU: wall, CPU-seconds and peak working set per song length and dtype.

Builds the published ACE-Step 1.5 Oobleck VAE (engine/published_configs.py) with RANDOM weights (speed and
memory do not depend on the values), and decodes a random latent of each length in a fresh child process,
so each row's peak RSS is its own: working set = peak RSS during the decode - RSS once the VAE is loaded.
The per-second fit (least squares over the lengths) is what engine/memory.py's decode estimate uses.

    .venv/bin/python bench/vae_cpu.py --durations 10 30 60 --dtypes bfloat16 float32 --fold both
    .venv/bin/python bench/vae_cpu.py --durations 10 30 --dtypes bfloat16 --decoders stock fast fast-eager

--decoders: stock (diffusers' decoder as loaded), fast (engine/vae_fast.py: channels-last, compiled fused Snake,
as the worker runs it; its compile is timed separately, at load), fast-eager (the same without the compiler).
Each fast row's `max_abs_diff` is against the stock row of the same length and dtype (same seed, same weights);
with --reference, every row's `err_vs_f32` is against a float32 stock decode of the same latent (bf16 rounds
differently along each path, and a deep random decoder amplifies it: compare the errors, not the paths).

--stage encode times the encoder instead (a source's encode for cover / repaint / reference: random audio of each
length in, the latent distribution's parameters compared), with the same --decoders choices (the fast install covers
both halves of the VAE):

    .venv/bin/python bench/vae_cpu.py --stage encode --durations 30 --dtypes bfloat16 --decoders stock fast

Each child runs with OMP_WAIT_POLICY=PASSIVE (as the worker does) unless the caller set a policy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cpu_target import passive_omp_wait_policy  # noqa: E402  (torch-free)
from measure import cpu_with_children, peak_rss_bytes, reset_peak, rss_bytes, run_child, timed  # noqa: E402


def child(seconds: float, dtype_name: str, fold: bool, decoder: str = "stock", audio_out: str = "",
          stage: str = "decode") -> dict:
    import torch
    from diffusers import AutoencoderOobleck

    from engine.published_configs import VAE

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    vae = AutoencoderOobleck(**VAE).to(dtype).eval()
    if fold:  # fold weight norm into plain weights (it is recomputed on every call otherwise)
        from engine.vae_fast import fold_weight_norm

        fold_weight_norm(vae)
    compile_s = compile_cpu_s = 0.0
    if decoder != "stock":
        from engine import vae_fast

        c0 = cpu_with_children()
        info = vae_fast.install(vae, compile_snake=decoder == "fast")
        compile_s, compile_cpu_s = info.compile_s, cpu_with_children() - c0
        if decoder == "fast" and info.snake != "compiled":
            raise SystemExit(f"the Snake did not compile: {info.reason}")
    frames = round(seconds * 25)
    if stage == "encode":  # the output is the latent distribution's mean and scale; "audio" names it below
        hop = VAE["sampling_rate"] // 25
        x = 0.3 * torch.randn(1, VAE["audio_channels"], frames * hop, dtype=dtype)
        run = lambda inp: vae.encode(inp).latent_dist.parameters  # noqa: E731
        warm = torch.randn(1, VAE["audio_channels"], 8 * hop, dtype=dtype)
    else:
        x = torch.randn(1, VAE["decoder_input_channels"], frames, dtype=dtype)
        run = lambda inp: vae.decode(inp).sample  # noqa: E731
        warm = torch.randn(1, VAE["decoder_input_channels"], 8, dtype=dtype)
    with torch.inference_mode():
        run(warm)  # first-call set-up
    base = rss_bytes()
    reset_peak()  # building the model peaks higher than the decode
    with timed() as span, torch.inference_mode():
        audio = run(x)
    wall, cpu = span.wall_s, span.cpu_s
    peak = peak_rss_bytes()
    if audio_out:
        torch.save(audio.float(), audio_out)
    return {"stage": stage, "seconds": seconds, "dtype": dtype_name, "fold_weight_norm": fold, "decoder": decoder,
            "compile_s": round(compile_s, 1), "compile_cpu_s": round(compile_cpu_s, 1), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "working_set_gib": round((peak - base) / 2**30, 3),
            "peak_rss_gib": round(peak / 2**30, 3), "samples": int(audio.shape[-1]),
            "threads": torch.get_num_threads()}


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
    p.add_argument("--decoders", nargs="+", default=["stock"], choices=["stock", "fast", "fast-eager"])
    p.add_argument("--reference", action="store_true", help="also decode each length in float32 (stock) as truth")
    p.add_argument("--cold-compile", action="store_true", help="each child compiles with an empty inductor cache")
    p.add_argument("--stage", choices=["decode", "encode"], default="decode")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(float(args.child[0]), args.child[1], args.child[2] == "yes", args.child[3],
                               args.child[4] if args.child[4] != "-" else "", args.child[5])))
        return
    folds = {"no": ["no"], "yes": ["yes"], "both": ["no", "yes"]}[args.fold]
    rows = []
    import tempfile

    import torch

    audio_dir = tempfile.mkdtemp(prefix="vae_cpu_")
    for dtype in args.dtypes:
        for fold in folds:
            for seconds in args.durations:
                truth = os.path.join(audio_dir, f"float32-{fold}-{seconds:g}-truth.pt")
                if args.reference and not os.path.exists(truth):
                    env = dict(os.environ)
                    passive_omp_wait_policy(env)
                    run_child([__file__, "--child", str(seconds), "float32", fold, "stock", truth, args.stage], env=env)
                for decoder in args.decoders:  # side by side: the same length's variants back to back
                    env = dict(os.environ)
                    passive_omp_wait_policy(env)  # as the worker runs
                    if args.cold_compile:  # an empty inductor cache: the compile a fresh worker host pays
                        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_", dir=audio_dir)
                    audio = os.path.join(audio_dir, f"{dtype}-{fold}-{seconds:g}-{decoder}.pt")
                    row = run_child([__file__, "--child", str(seconds), dtype, fold, decoder, audio, args.stage], env=env)
                    stock = os.path.join(audio_dir, f"{dtype}-{fold}-{seconds:g}-stock.pt")
                    if decoder != "stock" and os.path.exists(stock):
                        want, got = torch.load(stock), torch.load(audio)
                        row["max_abs_diff"] = round((got - want).abs().max().item(), 5)
                        row["max_abs_ref"] = round(want.abs().max().item(), 4)
                    if args.reference:
                        row["err_vs_f32"] = round((torch.load(audio) - torch.load(truth)).abs().max().item(), 5)
                    if decoder != "stock":
                        os.remove(audio)
                    rows.append(row)
                    print(json.dumps(rows[-1]), flush=True)
    import shutil

    shutil.rmtree(audio_dir, ignore_errors=True)
    from engine import memory

    print("\n| stage | song | dtype | fold wn | decoder | wall s | CPU-s | working set GiB | engine estimate GiB | peak RSS GiB "
          "| compile wall s | max abs diff vs stock | max abs err vs float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        estimate = memory.vae_decode_bytes(1, r["seconds"], 128, 2 if r["dtype"] == "bfloat16" else 4) / memory.GB
        estimated = f"{estimate:.2f}" if r["stage"] == "decode" else "-"  # the engine estimates the decode only
        diff = f"{r['max_abs_diff']} (of {r['max_abs_ref']})" if "max_abs_diff" in r else "-"
        print(f"| {r['stage']} | {r['seconds']:g} s | {r['dtype']} | {r['fold_weight_norm']} | {r['decoder']} | {r['wall_s']} | "
              f"{r['cpu_s']} | {r['working_set_gib']} | {estimated} | {r['peak_rss_gib']} | {r['compile_s']} | {diff} | {r.get('err_vs_f32', '-')} |")
    for dtype in args.dtypes:
        for fold in folds:
            sel = [r for r in rows if r["dtype"] == dtype and r["fold_weight_norm"] == (fold == "yes")
                   and r["decoder"] == "stock"]
            if len(sel) >= 2 and args.stage == "decode":
                a, b = fit_per_second(sel)
                print(f"fit {dtype} fold={fold}: working set ~ {a:.3f} + {b:.4f} GiB/s of song (per item)")


if __name__ == "__main__":
    main()
