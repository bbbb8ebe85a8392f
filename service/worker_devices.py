"""A worker's devices as its heartbeat carries them: the engine's DeviceReport (engine/types.py) turned into
the stored payload, bounded so a fleet of beats stays small (DynamoDB keeps every beat in one item).

Memory is in bytes here; the API shows upstream's GB (service/gpu_status.py).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel

from engine.types import DeviceReport

MAX_GPUS = 16  # listed per worker (an 8-GPU node fits; more is counted in `gpu_count`)
MAX_NAME = 80  # characters of a device or CPU name


class GpuState(BaseModel):
    index: int
    name: str
    total_bytes: int
    free_bytes: Optional[int] = None  # None: not read (a card the engine does not use, without NVML)
    compute_capability: Optional[tuple[int, int]] = None


class HostState(BaseModel):
    cpu: str
    cores: int
    total_ram_bytes: Optional[int] = None
    available_ram_bytes: Optional[int] = None


class PlacementState(BaseModel):
    dit: str
    vae: str
    text_encoder: str
    lm: Optional[str] = None
    lm_tensor_parallel: int = 1


class WorkerDevices(BaseModel):
    device: str  # the engine's: "cuda:0", "cpu", "mps"
    kind: str  # its type: "cuda", "cpu", "mps"
    gpus: list[GpuState] = []  # [] on a CPU worker's machine
    gpu_count: int = 0  # all it sees (gpus lists the first MAX_GPUS)
    host: HostState
    placement: PlacementState
    models: list[str] = []
    lm_model: Optional[str] = None
    dtype: str
    lm_dtype: Optional[str] = None
    quantization: dict[str, str] = {}
    offload_mode: str = "none"
    offload_active: bool = False


def _short(text: str) -> str:
    return text if len(text) <= MAX_NAME else text[: MAX_NAME - 1] + "…"


def worker_devices(report: DeviceReport) -> WorkerDevices:
    p = report.placement
    return WorkerDevices(
        device=report.device, kind=report.device.split(":", 1)[0],
        gpus=[GpuState(index=g.index, name=_short(g.name), total_bytes=g.total_bytes, free_bytes=g.free_bytes,
                       compute_capability=g.compute_capability) for g in report.gpus[:MAX_GPUS]],
        gpu_count=len(report.gpus),
        host=HostState(cpu=_short(report.host.cpu), cores=report.host.cores, total_ram_bytes=report.host.total_ram_bytes,
                       available_ram_bytes=report.host.available_ram_bytes),
        placement=PlacementState(dit=p.dit, vae=p.vae, text_encoder=p.text_encoder, lm=p.lm,
                                 lm_tensor_parallel=p.lm_tensor_parallel),
        models=list(report.models), lm_model=report.lm_model, dtype=report.dtype, lm_dtype=report.lm_dtype,
        quantization=dict(report.quantization), offload_mode=report.offload_mode, offload_active=report.offload_active)


__all__ = ["GpuState", "HostState", "MAX_GPUS", "PlacementState", "WorkerDevices", "worker_devices"]
