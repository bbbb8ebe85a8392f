"""Adapter switch vs model load: what changing a LoRA/LoKr between batches costs, against loading the model again.

On a random-weight DiT (tiny by default; `--full-size` builds one with the published 2B shapes, bf16, on CPU unless
`--device cuda`), with random-weight adapters written in upstream's trainer layouts (engine/adapter_builder.py):
  * model load   -- AceStepPipeline.from_pretrained of the saved checkpoint (tiny: the whole pipeline; full size:
                    the DiT alone, AceStepTransformer1DModel.from_pretrained), then one read of every weight page
                    (safetensors maps the file; the OS page cache is warm: a cold disk only adds to this), what a
                    restart per adapter would cost at least;
  * first load   -- AdapterLibrary.activate of an adapter not yet loaded (read, check, inject PEFT layers);
  * warm switch  -- activate between two loaded adapters (PEFT set_adapters: no weights move);
  * to none      -- activate([]) (adapters disabled: the base layers alone).
Each figure is the best of --repeats (interference on a shared machine only adds time). Random weights: these
adapters are noise; the timings are what matters.
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

from measure import best  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true", help="the published 2B DiT's shapes (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rank", type=int, default=0, help="LoRA rank (default 4 tiny, 64 full size)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        run(args, Path(tmp))


def run(args, root: Path) -> None:
    import torch
    from diffusers import AceStepPipeline, AceStepTransformer1DModel

    from engine.adapter_builder import build_tiny_adapter
    from engine.adapters import AdapterLibrary, model_shape
    from engine.weights.checkpoints import build_tiny_checkpoint
    from engine.weights.random_pipeline import build_transformer
    from engine.request import AdapterRef

    size = "full" if args.full_size else "tiny"
    rank = args.rank or (64 if args.full_size else 4)
    dtype = torch.bfloat16 if args.full_size else torch.float32
    t0 = time.perf_counter()
    if args.full_size:  # the DiT alone: the VAE/text encoder are untouched by adapters and by a DiT reload
        torch.set_default_dtype(dtype)  # built in bf16: 3 GB, not 6 GB of float32 first
        transformer = build_transformer("acestep-v15-turbo", size="full")
        torch.set_default_dtype(torch.float32)
        transformer.save_pretrained(root / "transformer")
        del transformer

        def load():
            return AceStepTransformer1DModel.from_pretrained(root / "transformer", dtype=dtype).to(args.device)
    else:
        build_tiny_checkpoint(root / "model", model_name="acestep-v15-turbo")

        def load():
            return AceStepPipeline.from_pretrained(str(root / "model"), dtype=dtype).to(args.device)
    print(f"built the {size} random-weight model in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def load_and_read():  # safetensors maps the file: a load is only paid once every weight page is read
        model = load()
        modules = [model] if args.full_size else [c for c in model.components.values() if isinstance(c, torch.nn.Module)]
        with torch.no_grad():
            for module in modules:
                for param in module.parameters():
                    param.detach().reshape(-1)[::1024].float().sum()
        return model

    model_load = best(load_and_read, max(1, args.repeats // 2 if args.full_size else args.repeats))
    loaded = load()
    # full size: the DiT alone, in the shape of a pipeline as far as the loader looks (no offloading hooks)
    pipe = loaded if not args.full_size else type("DiTOnly", (), {"transformer": loaded, "hf_device_map": None,
                                                                 "components": {"transformer": loaded}})()
    shape = model_shape(pipe)  # type: ignore[arg-type]
    lora_dir = root / "loras"
    for i, (name, kind) in enumerate((("a", "lora"), ("b", "lora"), ("k", "lokr"))):
        build_tiny_adapter(lora_dir / name, shape, kind, rank=rank if kind == "lora" else max(2, rank // 16), seed=i)

    library = AdapterLibrary(lora_dir, root / "cache", 1 << 34)
    a, b, k = AdapterRef(name="a"), AdapterRef(name="b", scale=0.8), AdapterRef(name="k")
    firsts = {}
    for ref in (a, b, k):
        t0 = time.perf_counter()
        library.activate("m", pipe, [ref])  # type: ignore[arg-type]
        firsts[ref.name] = time.perf_counter() - t0
    state = {"flip": False}

    def switch():
        state["flip"] = not state["flip"]
        library.activate("m", pipe, [a] if state["flip"] else [b])  # type: ignore[arg-type]

    warm = best(switch, args.repeats * 4)
    none = best(lambda: (library.activate("m", pipe, [a]), library.activate("m", pipe, [])), args.repeats) # type: ignore[arg-type]
    mb = {l["name"]: l["bytes"] / 2**20 for l in library.loaded()}
    print(f"\n{size} DiT ({'published 2B shapes' if args.full_size else 'tiny'}, random weights), "
          f"{args.device}, {str(dtype).replace('torch.', '')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print("| what | seconds |\n|---|---:|")
    print(f"| model load ({'DiT' if args.full_size else 'whole pipeline'} from_pretrained + read, warm cache) "
          f"| {model_load:.3f} |")
    print(f"| first load, LoRA rank {rank} ({mb['a']:.3f} MB) | {firsts['a']:.3f} |")
    print(f"| first load, LoKr ({mb['k']:.3f} MB) | {firsts['k']:.3f} |")
    print(f"| warm switch LoRA a -> LoRA b | {warm:.4f} |")
    print(f"| switch on and off (a, then none) | {none:.4f} |")
    print(f"\nwarm switch / model load: {warm / model_load:.4f}")


if __name__ == "__main__":
    main()
