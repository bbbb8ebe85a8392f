"""Weight-only quantisation of the DiT and the 5 Hz LM after loading (ACESTEP_QUANTIZE, torchao's `quantize_`).

    none  the weights stay in the engine's dtype
    int8  every nn.Linear weight stored as int8 with one scale per output row (torchao Int8WeightOnlyConfig):
          about half of bf16's bytes for those layers; activations stay in the engine's dtype
    fp8   float8 e4m3 weights (torchao Float8WeightOnlyConfig): CUDA GPUs of compute capability 8.9+ only

Applied with torchao's `quantize_` on the loaded module rather than diffusers' `TorchAoConfig`: diffusers
0.42's torchao quantizer still imports tensor classes torchao 0.18 removed, and a module quantised in place
keeps the engine's one load path (shared components, adapters). PEFT 0.21 wraps an int8 Linear in its
TorchaoLoraLinear, so LoRA and LoKr adapters still act on a quantised DiT (never merged: the engine only
switches them).

On CPU fp8 is refused at start: no CPU has fp8 matmuls, torchao dequantises every fp8 weight on each call
(bench/quantize.py --layer: 5-45x bf16's time for a 2048x6144 layer), and int8 saves the same memory at a
fifth of fp8's error. int8 on CPU also converts its weights per call (1.5-2.7x bf16's time per layer; a DiT step
1.1x, an LM decode step 4x): it is a memory saving there, not a speed-up (bench/RESULTS.md).
"""
from __future__ import annotations

import logging
from typing import Iterable

from engine.types import GenerationError

MODES = ("none", "int8", "fp8")
# Bytes per quantised weight, and per output row for its scale
WEIGHT_BYTES = {"int8": 1, "fp8": 1}
ROW_BYTES = 5  # per output row: a float32 scale and an int8 zero point (torchao 0.18 Int8Tensor; at most)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: torchao's fp8 kernels


def parse_mode(value: str | None, setting: str = "ACESTEP_QUANTIZE") -> str:
    """A mode from a setting's text ("" / None: none); a clear ValueError otherwise."""
    mode = (value or "none").strip().lower() or "none"
    if mode not in MODES:
        raise ValueError(f"{setting}={value!r} is not a quantisation mode; use one of: {', '.join(MODES)}")
    return mode


def check_supported(mode: str, device, what: str) -> None:
    """Refuse at start, with the reason, a mode the device cannot run."""
    if mode != "fp8":
        return
    import torch

    kind = getattr(device, "type", str(device))
    if kind != "cuda":
        raise GenerationError(
            f"{what}: fp8 quantisation needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); on {kind} "
            "torchao would dequantise every fp8 weight on each call (5-45x bf16's time here). "
            "Use ACESTEP_QUANTIZE=int8 for the same memory saving, or none.")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise GenerationError(
            f"{what}: fp8 quantisation needs compute capability 8.9+; this GPU has "
            f"{capability[0]}.{capability[1]}. Use ACESTEP_QUANTIZE=int8, or none.")


def _config(mode: str):
    with _quiet_torchao():
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    return Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()


def quantize_module(module, mode: str, skip: Iterable[str] = ()) -> int:
    """Quantise `module`'s nn.Linear weights in place (those named in `skip` and their children excepted);
    returns how many layers changed. Tied weights (an LM head sharing the embedding) belong in `skip`:
    quantising one side would store the matrix twice."""
    if mode == "none":
        return 0
    import torch

    with _quiet_torchao():
        from torchao.quantization import quantize_

    skipped = tuple(skip)
    chosen: list[str] = []

    def linear_to_quantise(layer, fqn: str) -> bool:
        hit = isinstance(layer, torch.nn.Linear) and not any(fqn == s or fqn.startswith(s + ".") for s in skipped)
        if hit:
            chosen.append(fqn)
        return hit

    quantize_(module, _config(mode), filter_fn=linear_to_quantise)
    _own_storage(module)
    _return_freed_heap()
    return len(chosen)


def _own_storage(module) -> None:
    """Give every tensor quantize_ left as it was (norms, biases, skipped layers) its own memory. Loaded on CPU,
    they are views into the safetensors file's one mapping, which stays mapped, every page read by quantising
    resident, while any of them lives: a full-size int8 DiT kept its bf16 file's 2.93 GiB resident beside the
    int8 weights (bench/RESULTS.md). Copied, the mapping goes with the full-precision weights."""
    import itertools

    import torch

    seen: set[int] = set()
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) in seen or type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu":
            continue  # a quantised tensor holds new storage; other devices hold copies already
        seen.add(id(tensor))
        tensor.data = tensor.detach().clone()


def _return_freed_heap() -> None:
    """Give the freed full-precision weights' pages back to the system. glibc keeps them in the heap after
    quantising on CPU: 0.2-1 GiB more resident than the int8 weights at full size (bench/memory_table.py),
    memory the fit check does not count. A no-op off glibc (musl, macOS) and for CUDA memory."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def tied_output_head(model) -> list[str]:
    """The LM's output layer name when it shares the input embedding's matrix (Qwen3's tie_word_embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return []
    return [name for name, layer in model.named_modules() if layer is head]


def storage_bytes(module) -> int:
    """Bytes the module's parameters and buffers hold, a quantised tensor counted by what it stores
    (int8 data + scales), each shared tensor once."""
    import itertools

    seen: set[int] = set()
    total = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor) -> int:
    import torch

    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        inner, _ctx = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


def quantised_weight_bytes(shape: list[int], mode: str) -> int:
    """What one Linear weight of `shape` [out, in] takes quantised (engine/memory.py's estimate)."""
    rows = shape[0]
    count = 1
    for dim in shape:
        count *= dim
    return count * WEIGHT_BYTES[mode] + rows * ROW_BYTES


class _ImportNoise(logging.Filter):
    """Drops the warnings importing torchao (diffusers does, at its import) logs on a machine without its CUDA
    extensions or Triton, torch's deprecation note on how torchao registers its enums, and diffusers' note about
    torchao-serialised checkpoints, which the engine never loads."""

    NOISE = ("Failed to load ", "Detected no triton", "Warning: Detected no triton", "Unable to import `torchao`")

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg) % record.args if record.args else str(record.msg)
        return not (text.startswith(self.NOISE) or "is an Enum subclass and is now natively supported" in text)


def hide_import_noise() -> None:
    """Installed when this module is imported (engine.config imports it, before anything imports diffusers)."""
    for name in ("torchao", "torchao.kernel.intmm", "diffusers.quantizers.torchao.torchao_quantizer",
                 "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ImportNoise) for f in logger.filters):
            logger.addFilter(_ImportNoise())


class _quiet_torchao:
    """torchao's import logs a warning per CUDA-only extension it cannot load (all of them on CPU): noise."""

    def __enter__(self):
        self._logger = logging.getLogger("torchao")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False


hide_import_noise()

__all__ = ["MODES", "check_supported", "parse_mode", "quantize_module", "quantised_weight_bytes", "storage_bytes",
           "tied_output_head"]
