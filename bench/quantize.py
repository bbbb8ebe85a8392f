"""ACESTEP_QUANTIZE at full size on CPU: weight memory and step time, bf16 vs int8 (engine/quantize.py), side by side.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/quantize.py [--seconds 30] [--repeats 3] [--lm [--no-dit]] [--threads 2]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/quantize.py --layer   # one layer: bf16 vs int8 vs fp8

  * DiT: the published 2B turbo DiT's shapes (engine/published_configs.py; random weights, built in bf16), one
    diffusion step (a transformer forward, batch 1, turbo: no CFG) for a --seconds song, timed in bf16, then the
    same module quantised in place to int8 and timed again on the same inputs; weights measured (what the
    tensors store) and as the fit check estimates them (engine/memory.py's rule, from the same shapes); the
    step's output difference int8 vs bf16 (relative L2).
  * --lm: the 1.7B 5 Hz LM's shape (bench/lm.py LM_1_7B: vocabulary 217,204, tied head; random weights, bf16),
    one codes-phase decode step with CFG (2 rows, KV cache after a 64-token prompt), the model's whole head,
    bf16 then int8 (the tied head/embedding stays bf16: one matrix).
One full-size model in memory at a time (peak: the bf16 model plus one layer being quantised). Each time is the
best of --repeats (interference on a shared machine only adds time). Random weights: the timings and bytes are
what matters.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import GIB, best, peak_rss_bytes, rss_bytes  # noqa: E402


def estimated_bytes(module, mode: str) -> int:
    """engine/memory.py's rule applied to the module's own tensors (what it reads from safetensors headers)."""
    from engine.memory import _is_linear_weight
    from engine.quantize import quantised_weight_bytes

    total = 0
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied head is the embedding's matrix: not stored twice, not in the files
            continue
        seen.add(id(tensor))
        shape = list(tensor.shape)
        if mode != "none" and tensor.is_floating_point() and _is_linear_weight(name, shape):
            total += quantised_weight_bytes(shape, mode)
        else:
            total += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
    return total


def dit(args) -> list[str]:
    import torch

    from engine import quantize
    from engine.weights.random_pipeline import build_transformer

    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never the float32 copy
    model = build_transformer("acestep-v15-turbo", size="full").eval()
    torch.set_default_dtype(torch.float32)
    built = time.perf_counter() - t0
    cfg = model.config
    frames = int(args.seconds * 25)  # 25 Hz latents
    gen = torch.Generator().manual_seed(0)
    acoustic = int(cfg.audio_acoustic_hidden_dim)
    inputs = dict(
        hidden_states=torch.randn(1, frames, acoustic, generator=gen).bfloat16(),
        context_latents=torch.randn(1, frames, int(cfg.in_channels) - acoustic, generator=gen).bfloat16(),
        encoder_hidden_states=torch.randn(1, args.condition_tokens, int(cfg.hidden_size), generator=gen).bfloat16(),
        timestep=torch.tensor([0.5]).bfloat16(), timestep_r=torch.tensor([0.5]).bfloat16(), return_dict=False)

    def step():
        with torch.inference_mode():
            return model(**inputs)[0]

    rows = []
    reference = None
    for mode in ("none", "int8"):
        t0 = time.perf_counter()
        layers = quantize.quantize_module(model, mode)
        quantise_s = time.perf_counter() - t0
        gc.collect()
        out = step()  # first call: allocator, oneDNN primitives
        seconds = best(step, args.repeats)
        error = "" if reference is None else f"{float((out.float() - reference).norm() / reference.norm()):.4f}"
        reference = out.float() if reference is None else reference
        stored = quantize.storage_bytes(model)
        rows.append(f"| DiT 2B, one step ({args.seconds:g} s song) | {'bf16' if mode == 'none' else 'int8'} "
                    f"| {stored / GIB:.2f} | {estimated_bytes(model, mode) / GIB:.2f} | {seconds:.2f} | {error or '-'} "
                    f"| {rss_bytes() / GIB:.2f} | {layers} layers in {quantise_s:.1f} s |")
    print(f"DiT built in {built:.0f} s", file=sys.stderr)
    del model, inputs, reference
    gc.collect()
    return rows


def lm(args) -> list[str]:
    import inspect

    import torch

    from engine import quantize  # first: it quiets torchao's import warnings, which transformers triggers
    from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM  # noqa: I001

    from bench.lm import LM_1_7B

    config = Qwen3Config(**LM_1_7B, bos_token_id=0, pad_token_id=0, eos_token_id=1)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    built = time.perf_counter() - t0
    prompt = torch.randint(0, 150000, (2, 64), generator=torch.Generator().manual_seed(0))  # CFG: 2 rows
    token = torch.randint(150000, 217000, (2, 1), generator=torch.Generator().manual_seed(1))
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    rows = []
    reference = None
    for mode in ("none", "int8"):
        t0 = time.perf_counter()
        layers = quantize.quantize_module(model, mode, skip=quantize.tied_output_head(model))
        quantise_s = time.perf_counter() - t0
        gc.collect()
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, use_cache=True, **{cache_kw: cache})
            position = torch.full((2, 1), prompt.shape[1])
            times, logits = [], None
            for i in range(args.repeats + 1):  # each step appends to the cache: the same work, one token longer
                t1 = time.perf_counter()
                logits = model(input_ids=token, position_ids=position + i, use_cache=True, logits_to_keep=1,
                               **{cache_kw: cache}).logits[:, -1].float()
                times.append(time.perf_counter() - t1)
        seconds = min(times[1:])
        error = "" if reference is None else f"{float((logits - reference).norm() / reference.norm()):.4f}"
        reference = logits if reference is None else reference
        stored = quantize.storage_bytes(model)
        rows.append(f"| LM 1.7B, one decode step (CFG, 2 rows) | {'bf16' if mode == 'none' else 'int8'} "
                    f"| {stored / GIB:.2f} | {estimated_bytes(model, mode) / GIB:.2f} | {seconds:.3f} | {error or '-'} "
                    f"| {rss_bytes() / GIB:.2f} | {layers} layers in {quantise_s:.1f} s |")
    print(f"LM built in {built:.0f} s", file=sys.stderr)
    del model
    gc.collect()
    return rows


def one_layer(args) -> list[str]:
    """One 2048 x 6144 bf16 Linear (the DiT's MLP width) in bf16, int8 and fp8 weight-only: why fp8 is refused on CPU."""
    import copy

    import torch

    from engine import quantize

    torch.manual_seed(0)
    base = torch.nn.Linear(2048, 6144).to(torch.bfloat16).eval()
    rows = []
    for batch in (2, 512):
        x = torch.randn(batch, 2048, dtype=torch.bfloat16)
        with torch.inference_mode():
            want = base(x).float()
        cells = []
        for mode in ("none", "int8", "fp8"):
            layer = copy.deepcopy(base)
            quantize.quantize_module(layer, mode) if mode != "none" else None
            with torch.inference_mode():
                layer(x)
                seconds = best(lambda: layer(x), max(3, args.repeats))
                error = float((layer(x).float() - want).norm() / want.norm())
            cells.append(f"{seconds * 1000:.1f} ms ({error:.4f})")
        rows.append(f"| one 2048x6144 layer, {batch} rows | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="song length the DiT step is for (25 latents/s)")
    p.add_argument("--condition-tokens", type=int, default=256, help="text + lyric + timbre condition length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--lm", action="store_true", help="also the 1.7B LM decode step")
    p.add_argument("--no-dit", action="store_true", help="the LM alone (with --lm)")
    p.add_argument("--layer", action="store_true", help="only one layer in bf16 / int8 / fp8 (seconds)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layer:
        print("| what | bf16 (rel. error) | int8 | fp8 |\n|---|---:|---:|---:|\n" + "\n".join(one_layer(args)))
        return
    rows = [] if args.no_dit else dit(args)
    if args.lm:
        rows += lm(args)
    print(f"\nCPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, random weights, best of {args.repeats}; peak RSS {peak_rss_bytes() / GIB:.2f} GiB")
    print("| what | weights | weights GiB (stored) | fit-check estimate GiB | step s | rel. error vs bf16 "
          "| RSS GiB | quantised |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
