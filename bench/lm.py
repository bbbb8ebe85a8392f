"""The 5 Hz LM's codes phase: tokens per second and the time to plan a song, batch 1 against batch 8.

Runs the transformers backend on a tiny random LM with the published token layout (64,000 code tokens,
so the LM head and the sampler see the real vocabulary size; the network itself is tiny). Each row
plans one song of --seconds (5 codes per second) with CFG on, the constraint on, top-p 0.9, and
reports decode tokens per second per sequence and in aggregate, and the constraint's share of the
decode time. Side by side in one run, so the ratio between rows is the figure to read; absolute
speed on a 2-core CPU says nothing about a GPU.

    .venv/bin/python bench/lm.py [--seconds 240] [--threads 1]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="song length to plan (codes = 5 x seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    import torch

    from engine.lm.planner import Planner
    from engine.lm.tiny import build_tiny_lm
    from engine.lm.transformers_backend import TransformersLM
    from engine.lm.types import SamplingParams

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lm = TransformersLM.load(build_tiny_lm(Path(tmp) / "tiny-lm", seed=0), device="cpu")
        planner = Planner(lm)
        target = int(round(args.seconds * 5))
        sampling = SamplingParams(temperature=0.85, cfg_scale=2.5, top_k=None, top_p=0.9, repetition_penalty=1.0)
        metadata = {"bpm": 120, "caption": "lofi piano", "duration": int(args.seconds), "keyscale": "C major",
                    "language": "en", "timesignature": 4}
        planner.codes("warm up", "", metadata, seeds=[0], sampling=sampling, target=20)
        print(f"5 Hz LM codes phase, tiny random LM (64,000 code tokens), CPU, {args.threads} thread(s), "
              f"Python {platform.python_version()}, torch {torch.__version__}; {target} codes per song, CFG 2.5")
        print()
        print("| batch | song s (wall) | tokens/s per sequence | tokens/s aggregate | constraint share of decode |")
        print("|---:|---:|---:|---:|---:|")
        rows = {}
        for batch in (int(b) for b in args.batches.split(",")):
            codes, _, stats = planner.codes("lofi piano", "[verse] la la", metadata, seeds=list(range(batch)),
                                            sampling=sampling, target=target)
            assert all(len(c) == target for c in codes)
            aggregate = sum(stats.generated_tokens) / stats.decode_s
            rows[batch] = aggregate
            print(f"| {batch} | {stats.seconds:.1f} | {aggregate / batch:.0f} | {aggregate:.0f} | "
                  f"{100 * stats.constraint_s / stats.decode_s:.1f}% |")
        if len(rows) > 1:
            first, last = min(rows), max(rows)
            print(f"\naggregate tokens/s, batch {last} / batch {first}: {rows[last] / rows[first]:.2f}x")


if __name__ == "__main__":
    main()
