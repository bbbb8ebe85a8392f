"""Typed task data shared by the API and the worker: the task record, its result, the models meta.

The stores persist these as JSON; both sides read them through these types, never as loose dicts.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Optional, cast

from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, ValidationError

from engine.request import GenerationRequest
from engine.types import GenerationInfo, Metas

from .worker_devices import WorkerDevices

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
CANCELLED = "cancelled"  # by the client (POST /v1/tasks/{id}/cancel)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


class AudioFile(BaseModel):
    """One generated file, stored under `key` (see blob_keys.output_key)."""
    model_config = ConfigDict(frozen=True)

    key: str
    format: str
    seed: Optional[int] = None
    duration: Optional[float] = None
    sample_rate: Optional[int] = None
    channels: Optional[int] = None


def _info_object(value: Any) -> GenerationInfo:
    if not isinstance(value, dict):
        raise ValueError("generation_info must be an object")
    return cast(GenerationInfo, dict(value))  # its keys as stored: the typed ones and the engine's others


# Stored and read back as it is (its keys' order and int/float values are what clients see), typed for mypy.
StoredInfo = Annotated[GenerationInfo, PlainValidator(_info_object), PlainSerializer(lambda info: info, return_type=Any)]


class TaskResult(BaseModel):
    """What a succeeded task produced."""

    audios: list[AudioFile] = []
    metas: Metas = Metas()  # bpm, duration, genres, key scale, time signature as the engine determined them
    # what ran, timings, notes; `random_weights` is true for a demo model
    generation_info: StoredInfo = GenerationInfo()
    dit_model: str = ""
    lm_model: str = ""

    @property
    def random_weights(self) -> bool:
        return bool(self.generation_info.get("random_weights"))


MODELS_META_KEY = "models"


class ModelEntry(BaseModel):
    name: str
    is_default: bool = False
    random_weights: Optional[bool] = None
    task_types: list[str] = []
    # The DiT's attention geometry adapters must fit (engine.adapter_manifest.ModelShape.as_dict()); None: not said
    adapter_shape: Optional[dict[str, int]] = None


class ModelsMeta(BaseModel):
    """What the last worker to start loaded (for /v1/models and /health); stored as meta `models`."""

    models: list[ModelEntry] = []
    device: Optional[str] = None
    dtype: Optional[str] = None
    lm_model: Optional[str] = None
    quantization: Optional[dict[str, str]] = None  # ACESTEP_QUANTIZE as the worker applied it: {dit, lm}
    worker_id: Optional[str] = None
    updated_at: Optional[float] = None

    def find(self, name: str) -> Optional[ModelEntry]:
        return next((m for m in self.models if m.name == name), None)

    @classmethod
    def parse(cls, stored: Optional[dict[str, Any]]) -> Optional["ModelsMeta"]:
        """The stored meta, or None when absent or unreadable (an older or foreign writer)."""
        if not isinstance(stored, dict):
            return None
        try:
            return cls.model_validate(stored)
        except ValueError:
            return None


HEARTBEAT_RETENTION_SECONDS = 86400  # a worker silent this long is forgotten


class WorkerHeartbeat(BaseModel):
    """A worker's periodic sign of life (for /health and operators)."""

    worker_id: str
    started_at: float
    beat_at: float  # wall-clock time of this beat
    state: str = "idle"  # idle | running | stopping | failed (its engine could not load: see error)
    task_ids: list[str] = []  # what it is running now
    last_progress_at: Optional[float] = None  # the engine's last progress report on the running task(s)
    error: Optional[str] = None
    # The 5 Hz LM it runs ("none": it runs none); None: not said (an older worker, or one that failed to load)
    lm_model: Optional[str] = None
    # The LoRA/LoKr adapters it holds loaded, "model/name" (switching to one of them costs no load)
    adapters: list[str] = []
    # The DiT models it serves ([]: not said), and its answer to the last POST /v1/init wish (service/model_switch.py)
    models: list[str] = []
    models_version: int = 0  # the wish (model_set.WantedModels.version) it last acted on
    models_loading: Optional[str] = None  # the set it is loading now, in words
    models_error: Optional[str] = None  # why that wish failed (it serves `models` still)
    devices: Optional[WorkerDevices] = None  # what its engine runs on (None: not said, or no engine loaded)

    def age(self, now: float) -> float:
        return max(0.0, now - self.beat_at)


GIVEN_BACK_STAGE = "waiting: handed back by a stopping worker"


class FailureReason(str, Enum):
    """Why a task ended without a result, set where it ended (its `error` says it in words)."""

    STALL_TIMEOUT = "stall_timeout"  # the engine made no progress for ACESTEP_STALL_TIMEOUT
    GENERATION_TIMEOUT = "generation_timeout"  # it ran past ACESTEP_GENERATION_TIMEOUT
    DEAD_LETTERED = "dead_lettered"  # every delivery's worker stopped (crashed, killed, out of memory)
    ENGINE_LOAD_FAILED = "engine_load_failed"  # the worker could not load its models
    LM_UNAVAILABLE = "lm_unavailable"  # it needs the 5 Hz LM, which the worker does not load
    INPUT_MISSING = "input_missing"  # a source upload is gone from storage
    INPUT_TOO_LARGE = "input_too_large"  # a source upload grew past the limit after submission
    COST_REFUSED = "cost_refused"  # over ACESTEP_MAX_TASK_COST as this worker counts it
    INVALID_REQUEST = "invalid_request"  # the stored request no longer parses (StoredRequestInvalid)
    MODEL_UNLOADED = "model_unloaded"  # it names a model POST /v1/init replaced before it ran
    ADAPTER_MISSING = "adapter_missing"  # an adapter it names is gone (folder deleted, default or upload removed)
    REJECTED = "rejected"  # the engine refused the request (GenerationError)
    ENGINE_ERROR = "engine_error"  # the engine crashed
    CANCELLED = "cancelled"  # by the client, or by an API call that stopped waiting for it


class StoredRequestInvalid(Exception):
    """A task's stored request no longer parses as a GenerationRequest (written by another version)."""

    def __init__(self, task_id: str, detail: str):
        super().__init__(f"the stored request no longer parses: {detail}")
        self.task_id = task_id


def load_request(task_id: str, stored: str, strict: bool = True) -> GenerationRequest:
    """A task's request from its stored JSON (what a store adapter calls).

    strict: StoredRequestInvalid when it no longer parses (a worker claiming it fails it with that
    reason). Not strict (showing or sweeping a task): the stored values as they are, unchecked.
    """
    try:
        return GenerationRequest.model_validate_json(stored)
    except ValidationError as exc:
        if strict:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
            raise StoredRequestInvalid(task_id, detail) from None
    raw = json.loads(stored)
    known = GenerationRequest.model_fields
    return GenerationRequest.model_construct(**{k: v for k, v in raw.items() if k in known})


def dump_request(request: GenerationRequest) -> str:
    """The stored form of a task's request (load_request reads it back)."""
    return request.model_dump_json()


@dataclass
class TaskRecord:
    task_id: str
    request: GenerationRequest  # validated at submission; the store adapters parse it back (load_request)
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    progress: float = 0.0
    stage: str = "queued"
    attempt: int = 0  # incremented by every claim; fences out stale workers
    given_back: int = 0  # claims that ended in a deliberate give-back (a stopping worker): not failed deliveries
    worker_id: Optional[str] = None
    result: Optional[TaskResult] = None
    error: Optional[str] = None
    reason: Optional[FailureReason] = None  # why it failed or was cancelled; None in records older than it
    # Blob keys this task owns (inputs and outputs); /v1/audio serves only these
    blob_keys: list[str] = field(default_factory=list)
    # The client's Idempotency-Key, when it sent one: a retried submit returns this task.
    # request_digest tells a true retry from a different request reusing the key.
    idempotency_key: Optional[str] = None
    request_digest: Optional[str] = None
    # Where the final result is POSTed once the task ends (service/webhooks.py), if the client asked.
    webhook_url: Optional[str] = None
    # Who submitted it (a digest of the API key, or the client address): per-caller limits count by it.
    owner: Optional[str] = None
