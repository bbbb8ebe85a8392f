"""What the routes answer, for /openapi.json (documentation only: the routes build plain dicts or
pre-serialised bytes; tests/test_openapi_conformance.py checks every answer against these)."""
from __future__ import annotations

from typing import Any, Generic, Literal, Optional, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Envelope(BaseModel, Generic[T]):
    """Upstream's success envelope (envelope.wrap); `timestamp` in milliseconds."""
    data: T
    code: int
    error: Optional[str]
    timestamp: int
    extra: Any = None


class SubmittedTask(BaseModel):
    task_id: str
    status: Literal["queued"]
    queue_position: Optional[int]


class QueryEntry(BaseModel):
    task_id: str
    status: Literal[0, 1, 2]  # queued/running, succeeded, failed (also cancelled)
    result: str  # a JSON list: one item per audio file, or one status item
    progress_text: str
    error: Optional[str] = None


class CancelOutcome(BaseModel):
    task_id: str
    status: str
    cancelled_now: bool


class PresignedPut(BaseModel):
    """Where and how a client PUTs a file itself (an audio source or an adapter)."""
    key: str
    upload_url: str
    method: Literal["PUT"]
    expires_in: int
    headers: dict[str, str]
    max_bytes: int


class UploadTicket(PresignedPut):
    role: Optional[Literal["src_audio", "reference_audio"]]
    field: str


class FormattedInput(BaseModel):
    caption: str
    lyrics: str
    bpm: Optional[int]
    key_scale: Optional[str]
    time_signature: Optional[str]
    duration: Optional[float]
    vocal_language: str


class CreatedSample(BaseModel):
    """/v1/create_sample's answer (upstream's names: keyscale, timesignature)."""
    caption: str
    lyrics: str
    bpm: Optional[int]
    keyscale: str
    duration: Optional[float]
    timesignature: str
    vocal_language: str


class Gpu(BaseModel):
    """Upstream's `gpus` item, as a live worker's heartbeat reported it."""
    index: int  # as the worker's torch numbers its visible devices
    name: str
    total_vram_gb: float
    free_vram_gb: Optional[float]  # null: a card the worker's engine does not use, where it could not read it (no NVML)
    compute_capability: Optional[list[int]] = None  # [major, minor]; absent when unknown
    worker_id: str  # ours: the worker that sees it


class DeviceMap(BaseModel):
    """Upstream's `device_map`: where each component computes ("cuda:0", "cpu", "mps")."""
    dit: str
    vae: str
    text_encoder: str
    lm: Optional[str]  # null: no 5 Hz LM
    lm_tensor_parallel: int
    summary: str  # "dit:0, vae:0, text_encoder:0, lm:0" (a CUDA device by index, else its type)
    multi_device: bool


class GpuKeys(BaseModel):
    """Upstream's GPU keys, from the live workers' heartbeats (the API process loads no torch)."""
    gpus: list[Gpu]  # every live worker's visible GPUs; [] with only CPU workers (or none) alive
    gpu_mapping: Optional[str]  # null: ACESTEP_GPU_MAPPING is not read here (engines run on ACESTEP_DEVICE)
    device_map: Optional[DeviceMap]  # the newest live worker's layout; null while no live worker has said


class ModelInventory(GpuKeys):
    """GET /v1/models and /v1/model_inventory (upstream's inventory and ours; more keys follow the settings)."""
    models: list[dict[str, Any]]
    default_model: Optional[str]
    lm_models: list[dict[str, Any]]
    loaded_lm_model: Optional[str]
    llm_initialized: bool


class Health(GpuKeys):
    """`workers[].devices` has each live worker's own devices: its GPUs, its host's CPU and RAM, what runs where."""
    status: Literal["ok", "degraded"]
    reasons: list[str]
    models_initialized: bool  # upstream's: the default model is loaded (here: by a live, healthy worker)
    llm_initialized: bool
    loaded_model: Optional[str]  # upstream's: the default model's name
    loaded_lm_model: Optional[str]


def ok(model: Any, description: str = "Successful Response") -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": description}}


__all__ = ["CancelOutcome", "CreatedSample", "DeviceMap", "Envelope", "FormattedInput", "Gpu", "GpuKeys", "Health",
           "ModelInventory", "PresignedPut", "QueryEntry", "SubmittedTask",
           "UploadTicket", "ok"]
