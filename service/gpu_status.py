"""Upstream's GPU keys (`gpus`, `gpu_mapping`, `device_map` on /health, /v1/models, /v1/model_inventory) from
the live workers' heartbeats: the API process never loads torch, the workers say what they run on.

Upstream answers for its one process; here a fleet answers:
  gpus        every live worker's visible GPUs, upstream's items plus the `worker_id` that sees them
              ([] when only CPU workers, or none, are alive: a CPU worker lists no GPU)
  gpu_mapping null: this server does not read ACESTEP_GPU_MAPPING (a worker's engine runs on ACESTEP_DEVICE)
  device_map  upstream's layout of the newest live worker (dit, vae, text_encoder, lm, lm_tensor_parallel,
              summary, multi_device); null while none has said
Each worker's own devices (its CPU and RAM too) are in /health's `workers[].devices` (`worker_view`).
The callers pass live beats only (service/observability/health.alive_only): a dead worker's GPUs do not show.
"""
from __future__ import annotations

from typing import Any, Optional

from .records import WorkerHeartbeat
from .worker_devices import GpuState, PlacementState, WorkerDevices

GIB = 1024 ** 3


def _gb(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / GIB, 2)


def gpu_entry(gpu: GpuState) -> dict[str, Any]:
    """Upstream's item: index, name, total_vram_gb, free_vram_gb, compute_capability ([major, minor], when known)."""
    out: dict[str, Any] = {"index": gpu.index, "name": gpu.name, "total_vram_gb": _gb(gpu.total_bytes),
                           "free_vram_gb": _gb(gpu.free_bytes)}
    if gpu.compute_capability is not None:
        out["compute_capability"] = list(gpu.compute_capability)
    return out


def _label(device: str) -> str:
    """A CUDA device by its index, anything else by its type (upstream's summary spelling)."""
    kind, _, index = device.partition(":")
    return (index or "0") if kind == "cuda" else kind


def device_map(placement: PlacementState) -> dict[str, Any]:
    parts = {"dit": placement.dit, "vae": placement.vae, "text_encoder": placement.text_encoder}
    if placement.lm is not None:
        parts["lm"] = placement.lm
    summary = ", ".join(f"{k}:{_label(v)}" for k, v in parts.items())
    if placement.lm_tensor_parallel > 1:
        summary += f", lm_tp={placement.lm_tensor_parallel}"
    return {"dit": placement.dit, "vae": placement.vae, "text_encoder": placement.text_encoder, "lm": placement.lm,
            "lm_tensor_parallel": placement.lm_tensor_parallel, "summary": summary,
            "multi_device": len(set(parts.values())) > 1}


def gpu_status(live: list[WorkerHeartbeat]) -> dict[str, Any]:
    """`gpus`, `gpu_mapping`, `device_map` from live workers' beats."""
    gpus = [gpu_entry(g) | {"worker_id": b.worker_id} for b in live if b.devices is not None for g in b.devices.gpus]
    newest = max((b for b in live if b.devices is not None), key=lambda b: b.beat_at, default=None)
    return {"gpus": gpus, "gpu_mapping": None,
            "device_map": device_map(newest.devices.placement) if newest and newest.devices else None}


def worker_view(devices: WorkerDevices) -> dict[str, Any]:
    """One worker's devices for /health's `workers[]`: its GPUs as upstream lists them, its host's CPU and RAM,
    what runs where, in which dtype, quantised and offloaded how."""
    host = devices.host
    return {"device": devices.device, "kind": devices.kind, "gpus": [gpu_entry(g) for g in devices.gpus],
            "gpu_count": devices.gpu_count,
            "host": {"cpu": host.cpu, "cores": host.cores, "total_ram_gb": _gb(host.total_ram_bytes),
                     "available_ram_gb": _gb(host.available_ram_bytes)},
            "device_map": device_map(devices.placement), "models": devices.models, "lm_model": devices.lm_model,
            "dtype": devices.dtype, "lm_dtype": devices.lm_dtype, "quantization": devices.quantization,
            "offload": {"mode": devices.offload_mode, "active": devices.offload_active}}


__all__ = ["device_map", "gpu_entry", "gpu_status", "worker_view"]
