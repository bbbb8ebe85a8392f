"""Will the models fit on the GPU? Checked before loading, so a worker refuses at start with numbers
instead of failing with an out-of-memory error on its first task.

A model's weights take about the size of its safetensors files, scaled to the dtype it is loaded in
(weights are stored in bf16; fp32 doubles them). Components shared between models are counted once.
Generation needs working memory on top (latents, attention, VAE decoding): WORKSPACE_BYTES covers
a batch of 8 four-minute songs at 2B sizes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

from engine.types import GenerationError

GB = 1024**3
WORKSPACE_BYTES = 4 * GB
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_bytes(model_dir: Path, dtype: str, skip_components: Iterable[str] = ()) -> int:
    """Bytes the model's weights take once loaded as `dtype` (the stored files are bf16 or fp32)."""
    skip = set(skip_components)
    total = 0
    for file in model_dir.rglob("*.safetensors"):
        if file.relative_to(model_dir).parts[0] in skip:
            continue
        total += _loaded_size(file, dtype)
    return total


def _loaded_size(file: Path, dtype: str) -> int:
    from safetensors import safe_open  # reads the header only, not the tensors

    size = 0
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            count = 1
            for dim in piece.get_shape():
                count *= dim
            stored = piece.get_dtype()
            floating = stored in ("F32", "BF16", "F16", "F64")
            size += count * (_DTYPE_BYTES.get(dtype, 4) if floating else _stored_bytes(stored))
    return size


def _stored_bytes(code: str) -> int:
    return {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(code, 4)


def check_fits(needed: int, free: Optional[int], device: str, what: str) -> None:
    """Raise a GenerationError that says how much is needed and how much is there."""
    if free is None:
        return
    if needed + WORKSPACE_BYTES > free:
        raise GenerationError(
            f"{what} needs about {needed / GB:.1f} GB for weights plus {WORKSPACE_BYTES / GB:.0f} GB to generate, "
            f"but {device} has {free / GB:.1f} GB free. Use a GPU with more memory, serve fewer models "
            f"(ACESTEP_CONFIG_PATH2/3), or a smaller model (2B instead of XL).")


def free_bytes(device) -> Optional[int]:
    """Free memory on a CUDA device; None elsewhere (CPU memory is not checked)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


# ---------------------------------------------------------------- VAE decode: tiled only when needed

SAMPLES_PER_LATENT_FRAME = 1920  # 48 kHz audio per 25 Hz latent frame (the VAE's hop)
# Tensors of the decoder's full-rate width alive at once at its peak (a residual unit's input, kept for the
# skip, plus activation and convolution outputs; the block before it runs at half the rate with twice the
# channels, the same size). An estimate from the layer shapes, not a measurement.
_LIVE_FULL_RATE_TENSORS = 4
DECODE_HEADROOM = 0.8  # use at most this share of what is free (fragmentation, the allocator's rounding)


def vae_decode_bytes(items: int, seconds: float, full_rate_channels: int, dtype_bytes: int) -> int:
    """Working memory an untiled VAE decode of `items` songs of `seconds` needs at its peak (estimate)."""
    frames = math.ceil(seconds * 25)
    return items * frames * SAMPLES_PER_LATENT_FRAME * full_rate_channels * dtype_bytes * _LIVE_FULL_RATE_TENSORS


def tile_vae_decode(allowed: bool, needed: int, free: Optional[int]) -> bool:
    """Tile the VAE decode (about 1.7x the decoder's compute, for its overlap) only when the request allows
    it and an untiled decode would not fit in what is free. Unknown free memory: untiled."""
    return allowed and free is not None and needed > free * DECODE_HEADROOM


def available_bytes(device) -> Optional[int]:
    """Memory a decode could use now: on CUDA the device's free memory plus what torch's allocator holds
    unused; on CPU the system's available memory (Linux); None when unknown."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
