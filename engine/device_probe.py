"""What the engine runs on: the visible GPUs (memory, compute capability), the host's CPU and RAM, and where
each component computes, as a DeviceReport (engine/types.py) for the worker's heartbeat.

Only `visible_gpus` touches torch, and only on a machine that has CUDA; the rest reads the OS, so a CPU
stand-in engine (tests/) reports its machine honestly without it. Static facts (names, totals) are read once;
free memory is read on every call (one heartbeat every few seconds).
"""
from __future__ import annotations

import functools
import os
import platform
from typing import TYPE_CHECKING, Optional, Sequence

from engine.memory import _meminfo
from engine.types import DeviceReport, GpuDevice, HostInfo, Placement

if TYPE_CHECKING:
    import torch

CPUINFO = "/proc/cpuinfo"


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it; else what Python knows (often just the architecture)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_info() -> HostInfo:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostInfo(cpu=cpu_name(), cores=cores, total_ram_bytes=_meminfo("MemTotal"),
                    available_ram_bytes=_meminfo("MemAvailable"))


def visible_gpus(used: frozenset[int] = frozenset()) -> tuple[GpuDevice, ...]:
    """Every CUDA device this process sees (not only the engine's), as upstream lists them; () without CUDA.
    `used`: the indices the engine computes on; the others' free memory comes from NVML, never from a new context."""
    import torch

    if not torch.cuda.is_available():
        return ()
    found = []
    for index in range(torch.cuda.device_count()):
        name, total, capability = _gpu_facts(index)
        free: Optional[int] = torch.cuda.mem_get_info(index)[0] if index in used else _nvml_free(index, total)
        found.append(GpuDevice(index=index, name=name, total_bytes=total,
                               free_bytes=None if free is None else int(free), compute_capability=capability))
    return tuple(found)


def auto_cuda_dtype() -> torch.dtype:
    """ACESTEP_DTYPE=auto on CUDA, for the DiT and the transformers LM: bf16, native at compute capability 8.0+
    and emulated by torch below (a T4, 7.5: slower, the same memory). Never float16: its range overflows in the
    DiT, and on pre-Ampere GPUs every song with lyrics gives NaN latents (upstream ACE-Step-1.5 issues #1243,
    #1274), which bf16's float32 range does not. float32 only where torch cannot even emulate bf16."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


@functools.lru_cache(maxsize=None)
def _gpu_facts(index: int) -> tuple[str, int, Optional[tuple[int, int]]]:
    """A card's name, total memory and compute capability: fixed for the process, so read once."""
    import torch

    total = int(torch.cuda.get_device_properties(index).total_memory)
    try:
        capability: Optional[tuple[int, int]] = tuple(torch.cuda.get_device_capability(index))  # type: ignore[assignment]
    except RuntimeError:
        capability = None
    return torch.cuda.get_device_name(index), total, capability


def _nvml_free(index: int, total: int) -> Optional[int]:
    import torch

    try:
        return max(0, total - int(torch.cuda.device_memory_used(index)))
    except Exception:  # nvidia-ml-py not installed, or no NVML (not NVIDIA)
        return None


def _cuda_index(device: str) -> Optional[int]:
    kind, _, index = device.partition(":")
    return (int(index) if index.isdigit() else 0) if kind == "cuda" else None


def device_label(device: str) -> str:
    """"cuda" means the first card: spelled "cuda:0", as torch places it."""
    return "cuda:0" if device == "cuda" else device


def report(device: str, models: Sequence[str], dtype: str, *, lm_model: Optional[str] = None,
           lm_device: Optional[str] = None, lm_dtype: Optional[str] = None,
           quantization: Optional[dict[str, str]] = None, offload_mode: str = "none",
           offload_active: bool = False, gpus: Optional[tuple[GpuDevice, ...]] = None) -> DeviceReport:
    """One engine's report: every component of its DiTs computes on `device`, the LM on `lm_device`.
    gpus None: probe them (torch) unless the device is the CPU and torch was never loaded."""
    device = device_label(device)
    lm_runs = lm_model not in (None, "", "none")
    if gpus is None:
        used = frozenset(i for i in (_cuda_index(device), _cuda_index(lm_device or device)) if i is not None)
        gpus = visible_gpus(used) if used or _torch_loaded() else ()
    return DeviceReport(
        device=device, gpus=gpus, host=host_info(),
        placement=Placement(dit=device, vae=device, text_encoder=device,
                            lm=device_label(lm_device or device) if lm_runs else None),
        models=tuple(models), lm_model=lm_model if lm_runs else None, dtype=dtype,
        lm_dtype=lm_dtype if lm_runs else None, quantization=dict(quantization or {"dit": "none", "lm": "none"}),
        offload_mode=offload_mode, offload_active=offload_active)


def _torch_loaded() -> bool:
    import sys

    return "torch" in sys.modules


__all__ = ["cpu_name", "device_label", "host_info", "report", "visible_gpus"]
