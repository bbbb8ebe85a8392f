"""How long the random-weight demo 5 Hz LM takes on each `make run` path (thinking, sample, format), with the
published token caps and with the demo's caps (engine/lm_bridge.DEMO_LM_BUDGETS).

A random-weight LM never writes a stop token, so every phase runs to its cap: the caps decide the time.
The LM is the one the launcher builds (engine.lm.tiny, 1,024 code tokens), on the CPU, loaded like a real one.

    .venv/bin/python bench/demo_lm.py [--paths thinking,sample,format] [--budgets both|published|demo]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REQUESTS = {  # what `make run`'s README examples and the Studio send, one per LM path
    "thinking": dict(prompt="upbeat pop song", thinking=True),
    "sample": dict(sample_query="a calm lofi track for studying"),
    "format": dict(prompt="upbeat pop song", lyrics="[verse]\nla la la\n[chorus]\noh oh oh", use_format=True,
                   analysis_only=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="thinking,sample,format")
    parser.add_argument("--budgets", choices=["both", "published", "demo"], default="both")
    args = parser.parse_args()

    import torch

    from engine.lm.folders import ensure_demo_lm
    from engine.lm.planner import Planner
    from engine.lm.transformers_backend import TransformersLM
    from engine.lm_bridge import DEMO_LM_BUDGETS, load_planner
    from engine.config import EngineConfig
    from engine.request import GenerationRequest

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = ensure_demo_lm(tmp, "acestep-5Hz-lm-1.7B", audio_codes=1024)
        demo = load_planner(EngineConfig(checkpoint_dir=tmp, lm_model=folder.name), "cpu")
        published = Planner(TransformersLM.load(folder), demo_seconds=demo.demo_seconds)
        planners = {"published": published, "demo": demo}
        chosen = ["published", "demo"] if args.budgets == "both" else [args.budgets]
        print(f"demo caps: {DEMO_LM_BUDGETS}; torch threads {torch.get_num_threads()}")
        for path in args.paths.split(","):
            request = GenerationRequest(**REQUESTS[path], batch_size=1)
            for name in chosen:
                t0 = time.perf_counter()
                lm_plan = planners[name].plan(request, seeds=[1])
                seconds = time.perf_counter() - t0
                tokens = sum(sum(p.generated_tokens) for p in lm_plan.phases)
                print(f"{path:9s} {name:9s} {seconds:7.1f} s  {tokens:5d} tokens  phases "
                      f"{[p.phase for p in lm_plan.phases]}  metadata {sorted(lm_plan.metadata)}", flush=True)


if __name__ == "__main__":
    main()
