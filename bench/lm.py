"""The 5 Hz LM's codes phase: tokens per second and the time to plan a song, transformers vs vLLM, batch 1 vs 8.

Runs both backends on one tiny random LM with the published token layout (65,535 code tokens, so the LM head
and the sampler see the real vocabulary size; the network itself is tiny). Each row plans one song of
--seconds per sequence (5 codes per second) with CFG on (--cfg), the constraint on, top-p 0.9, and reports
decode tokens per second per sequence and in aggregate, the share of decode time spent in the constraint
(allowed/advance and masking, both backends), and for vLLM the share spent in its logits processor as a whole
(constraint, CFG guidance and the pair's draw, which vLLM's own sampler cannot do for a pair).
Side by side in one run, so the ratios between rows are the figures to read; absolute speed on a 2-core CPU
says nothing about a GPU.

vLLM needs its venv (`make vllm-venv`, which also has transformers):

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/lm.py [--seconds 240] [--threads 1]
    .venv/bin/python bench/lm.py --backends pt          # transformers only
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(backend: str, path: Path):
    if backend == "vllm":
        from engine.lm.vllm_backend import VllmLM

        return VllmLM.load(path, max_model_len=4096, max_num_seqs=32, enforce_eager=True, dtype="float32")
    from engine.lm.transformers_backend import TransformersLM

    return TransformersLM.load(path, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="song length to plan (codes = 5 x seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (transformers)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--backends", default="pt,vllm")
    parser.add_argument("--cfg", type=float, default=2.5, help="lm_cfg_scale (1 = no guidance)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    from engine.lm.planner import Planner
    from engine.lm.tiny import build_tiny_lm
    from engine.lm.types import SamplingParams

    torch.set_num_threads(args.threads)
    target = int(round(args.seconds * 5))
    sampling = SamplingParams(temperature=0.85, cfg_scale=args.cfg, top_k=None, top_p=0.9, repetition_penalty=1.0)
    metadata = {"bpm": 120, "caption": "lofi piano", "duration": int(args.seconds), "keyscale": "C major",
                "language": "en", "timesignature": 4}
    versions = [f"torch {torch.__version__}"]
    rows: dict[tuple[str, int], float] = {}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_lm(Path(tmp) / "tiny-lm", seed=0)
        for backend in args.backends.split(","):
            lm = load(backend, path)
            if backend == "vllm":
                import vllm

                versions.append(f"vllm {vllm.__version__} ({lm.runner.upper()} model runner)")
            planner = Planner(lm)
            host = None
            if backend == "vllm":
                from engine.lm.vllm_backend import HOST as host
            planner.codes("warm up", "", metadata, seeds=[0], sampling=sampling, target=20)
            for batch in (int(b) for b in args.batches.split(",")):
                codes, _, stats = planner.codes("lofi piano", "[verse] la la", metadata, seeds=list(range(batch)),
                                                sampling=sampling, target=target)
                assert all(len(c) == target for c in codes)
                aggregate = sum(stats.generated_tokens) / stats.decode_s
                rows[(backend, batch)] = aggregate
                processor = f"{100 * host.seconds / stats.decode_s:.1f}%" if host is not None else ""
                lines.append(f"| {backend} | {batch} | {stats.seconds:.1f} | {aggregate / batch:.0f} | {aggregate:.0f} | "
                             f"{100 * stats.constraint_s / stats.decode_s:.1f}% | {processor} |")
            del planner, lm
    print(f"5 Hz LM codes phase, tiny random LM (65,535 code tokens), CPU, {args.threads} torch thread(s), "
          f"Python {platform.python_version()}, {', '.join(versions)}; {target} codes per song, CFG {args.cfg}")
    print()
    print("| backend | batch | song s (wall) | tokens/s per sequence | tokens/s aggregate | "
          "constraint share of decode | vLLM processor share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    print()
    batches = sorted({b for _, b in rows})
    for backend in args.backends.split(","):
        if len(batches) > 1:
            first, last = batches[0], batches[-1]
            print(f"{backend}: aggregate tokens/s, batch {last} / batch {first}: "
                  f"{rows[(backend, last)] / rows[(backend, first)]:.2f}x")
    if {"pt", "vllm"} <= {b for b, _ in rows}:
        for batch in batches:
            print(f"batch {batch}: vLLM / transformers aggregate tokens/s: "
                  f"{rows[('vllm', batch)] / rows[('pt', batch)]:.2f}x")


if __name__ == "__main__":
    main()
