"""GPU speed-ups behind flags (all off by default) and the start-up warm-up.

- ACESTEP_COMPILE_DIT: torch.compile the DiT's forward (the hooks that time stages stay outside it).
- ACESTEP_CUDA_GRAPHS: compile with mode "reduce-overhead", which replays CUDA graphs per input shape
  (one per song length and batch size; implies ACESTEP_COMPILE_DIT). On CPU inductor ignores it.
- ACESTEP_ATTENTION_BACKEND: diffusers' attention dispatcher backend for the DiT ("native" SDPA lets
  torch choose; "_native_flash", "_native_cudnn", "_native_efficient", "_native_math" pin one SDPA
  kernel; "flash", "sage", "xformers" need their packages). Empty: diffusers' default.
- ACESTEP_WARMUP: a tiny generation per model before the worker takes tasks (CUDA context, kernels,
  allocator, compilation); auto = on for CUDA.

Their effect on speed has not been measured here: no GPU was lent to this work (see bench/RESULTS.md).
"""
from __future__ import annotations

import logging

import torch

from engine.types import GenerationError

log = logging.getLogger("engine")

_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def warm_up_enabled(setting: str, device_type: str) -> bool:
    """ACESTEP_WARMUP: true / false, or auto (on for CUDA, where the first call pays for kernel selection,
    the allocator and any compilation; off on CPU, where a first call costs little extra)."""
    value = (setting or "auto").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value != "auto":
        raise GenerationError(f"ACESTEP_WARMUP must be auto, true or false (got {setting!r})")
    return device_type == "cuda"


def compile_options(compile_dit: bool, cuda_graphs: bool, backend: str) -> dict | None:
    """torch.compile keywords for the DiT, or None when it is not compiled. CUDA graphs are inductor's
    "reduce-overhead" mode; other backends take no mode."""
    if not (compile_dit or cuda_graphs):
        return None
    options: dict = {"backend": backend or "inductor"}
    if options["backend"] == "inductor":
        options["mode"] = "reduce-overhead" if cuda_graphs else "default"
    return options


def owning_outputs(forward):
    """`forward` whose results the caller owns. A CUDA-graph replay writes its outputs into the same
    memory every time, and a cover with audio_cover_strength < 1 calls the DiT twice per step and
    still reads the first result after the second call: each call starts a new graph step and
    returns copies."""
    from torch.utils._pytree import tree_map  # also walks diffusers' output classes, which register with it

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = forward(*args, **kwargs)
        return tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value, out)

    return call


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def apply(pipe, *, compile_dit: bool, cuda_graphs: bool, compile_backend: str, attention_backend: str) -> list[str]:
    """Apply the configured speed-ups to a loaded pipeline; returns what was applied (for the log)."""
    applied = []
    name = (attention_backend or "").strip()
    if name:
        known = attention_backends()
        if name not in known:
            raise GenerationError(f"unknown ACESTEP_ATTENTION_BACKEND {name!r}; use one of {', '.join(known)}")
        try:
            pipe.transformer.set_attention_backend(name)
        except Exception as exc:  # e.g. flash-attn not installed, or not on this device
            raise GenerationError(f"attention backend {name!r} is not usable here: {exc}") from None
        applied.append(f"attention backend {name}")
    options = compile_options(compile_dit, cuda_graphs, compile_backend)
    if options is not None:
        transformer = pipe.transformer
        # The forward only: the stage-timing hooks around it stay eager.
        compiled = torch.compile(transformer.forward, **options)
        transformer.forward = owning_outputs(compiled) if options.get("mode") == "reduce-overhead" else compiled
        applied.append("torch.compile of the DiT (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")")
    return applied
