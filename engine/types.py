"""Engine-side result types (torch-free, so the service can type against them).

Metas, GenerationInfo and EngineInfo use this project's own names (`key_scale`, None when unknown); the
presenters of upstream's wire shapes (service/task_payload.py, handlers/openrouter/responses.py) spell them
as upstream does (`keyscale`, "N/A").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from typing_extensions import TypedDict  # pydantic reads it on Python 3.11 (a TaskResult field)


class GenerationError(Exception):
    """A task cannot be run as asked; the message is shown to the client as the task's error."""


class GenerationCancelled(Exception):
    """Raised from the progress callback to stop a running generation (e.g. worker shutdown)."""


# progress(fraction 0..1, stage description). May raise GenerationCancelled.
ProgressCallback = Callable[[float, str], None]


# The MIME type of each audio_format, and of each output file extension (service/blob_keys.py: wav32 is stored
# as .wav; opus is Ogg Opus, aac is ADTS, as upstream writes them)
CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "wav32": "audio/wav", "flac": "audio/flac",
                 "opus": "audio/ogg", "aac": "audio/aac"}


@dataclass
class EncodedAudio:
    data: bytes
    format: str  # an audio_format of engine.request: mp3 | wav | wav32 | flac | opus | aac
    sample_rate: int
    channels: int
    duration_seconds: float
    seed: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass
class PendingAudio:
    """Generated audio not encoded yet: the caller encodes it (engine.audio_encode.encode_pending), e.g.
    in another process while the engine starts the next generation."""
    samples: Any  # a numpy float32 array [channels, samples] in [-1, 1], cut to its length, finite (this module is numpy-free)
    format: str  # an audio_format of engine.request: mp3 | wav | wav32 | flac | opus | aac
    sample_rate: int
    channels: int
    duration_seconds: float
    seed: int


Number = Union[int, float]  # kept as given: an int stays an int in what the API shows


class Metas(BaseModel):
    """What the song turned out to be, as the engine (or its 5 Hz LM) decided it; None: not known."""
    model_config = ConfigDict(populate_by_name=True)

    bpm: Optional[Number] = None
    duration: Optional[Number] = None  # seconds
    genres: Optional[str] = None  # only the 5 Hz LM writes genres
    # Results stored before these names were the project's own carry upstream's spellings and "N/A".
    key_scale: Optional[str] = Field(default=None, validation_alias=AliasChoices("key_scale", "keyscale"))
    time_signature: Optional[str] = Field(default=None,
                                          validation_alias=AliasChoices("time_signature", "timesignature"))

    @model_validator(mode="before")
    @classmethod
    def _unknown_is_none(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: None if v == "N/A" else v for k, v in data.items()}
        return data


class GenerationInfo(TypedDict, total=False):
    """What ran, on what, how long each stage took, and notes: shown to clients as it is.

    The keys other modules read are typed here; the engine adds more (model, device, steps, the LM's
    phases, ...), which the presenters show without knowing them.
    """
    random_weights: bool  # a demo model ran: the audio is noise
    test_engine: bool  # a test stand-in ran (tests/)
    notice: str
    task_type: str
    steps: int  # diffusion steps
    timings: dict[str, Number]  # seconds per stage
    notes: list[str]
    analysis_only: bool  # the LM only read or wrote metadata: no audio
    full_analysis_only: bool
    caption: str  # the caption (and lyrics) the LM wrote or the DiT ran on
    lyrics: str
    # what sample or format mode wrote (before phase 1 rewrote the caption): the song's prompt and lyrics in results
    lm_caption: str
    lm_lyrics: str
    language: str
    lm_metadata: dict[str, Any]  # the LM's own metadata, before user values won
    missing_parts: list[str]  # parts of a stored result that could not be read back (the DynamoDB spill)
    adapters: list[dict[str, Any]]  # the LoRA/LoKr adapters that acted on the DiT: name, scale, kind, rank


class EngineModel(TypedDict, total=False):
    name: str
    is_default: bool
    random_weights: bool
    task_types: list[str]
    path: Optional[str]
    adapter_shape: dict[str, int]  # the DiT geometry adapters must fit (engine.adapter_manifest.ModelShape)


class EngineInfo(TypedDict, total=False):
    """What an engine runs (Engine.describe()), for the models meta, heartbeats and operators."""
    device: str
    dtype: str
    dtype_choice: str
    default_model: str
    models: list[EngineModel]
    random_weights: bool
    notice: Optional[str]
    shared_components: dict[str, list[str]]
    lm_model: str  # "none": no 5 Hz LM
    lm_random_weights: Optional[bool]
    lm_dtype: Optional[str]  # the LM's weights' dtype (None: no LM)
    lm_configured: str
    offload: dict[str, Any]  # ACESTEP_OFFLOAD: mode, active, reason (engine/offload.py)
    quantization: dict[str, str]  # ACESTEP_QUANTIZE per model: {"dit": none|int8|fp8, "lm": ...}
    test_engine: bool
    loaded_adapters: list[dict[str, Any]]  # LoRA/LoKr adapters held in memory: model, name, kind, bytes
    # the adapters under ACESTEP_LORA_DIR: AdapterInfo.as_dict() + `models` it fits (+ `error` when none)
    local_adapters: list[dict[str, Any]]


@dataclass
class GenerationResult:
    audios: list[EncodedAudio]
    metas: Metas
    dit_model: str
    lm_model: str
    # what ran and how long each stage took; includes random_weights when the model is a demo
    generation_info: GenerationInfo = field(default_factory=lambda: GenerationInfo())
    # Asked for with encode=False: the audio still to encode, in order (then `audios` is empty).
    pending: list[PendingAudio] = field(default_factory=list)


@dataclass
class ModelInfo:
    name: str
    is_default: bool
    random_weights: bool  # a demo checkpoint: its audio is noise
    task_types: tuple[str, ...] = ()
    path: Optional[str] = None


@dataclass(frozen=True)
class GpuDevice:
    """One accelerator the worker's process can see, numbered as torch numbers them (after CUDA_VISIBLE_DEVICES)."""
    index: int
    name: str
    total_bytes: int
    # free now on the whole card (other processes' use included); None: a card this engine does not use, where only
    # opening a CUDA context on it (hundreds of MB) would tell (no NVML)
    free_bytes: Optional[int]
    compute_capability: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class HostInfo:
    """The machine's CPU and memory (a CPU worker's whole story; beside a GPU, the host)."""
    cpu: str  # the CPU's model name, or the machine architecture where the OS does not say
    cores: int  # the cores this process may run on
    total_ram_bytes: Optional[int]  # None: the OS does not say (no /proc/meminfo)
    available_ram_bytes: Optional[int]


@dataclass(frozen=True)
class Placement:
    """Where each component computes ("cuda:0", "cpu", "mps"); under offload its weights wait on the CPU between runs."""
    dit: str
    vae: str
    text_encoder: str
    lm: Optional[str]  # None: no 5 Hz LM loaded
    lm_tensor_parallel: int = 1


@dataclass(frozen=True)
class DeviceReport:
    """What the engine runs on, now (engine.device_probe builds it; the worker puts it in its heartbeat)."""
    device: str  # the engine's device: "cuda:0", "cpu", "mps"
    gpus: tuple[GpuDevice, ...]  # () on a machine without CUDA: a CPU worker lists no GPU
    host: HostInfo
    placement: Placement
    models: tuple[str, ...]  # the DiT model set loaded on `placement.dit`
    lm_model: Optional[str]  # the 5 Hz LM on `placement.lm`
    dtype: str  # the DiTs' weights
    lm_dtype: Optional[str]
    quantization: dict[str, str]  # {"dit": none|int8|fp8, "lm": ...} (ACESTEP_QUANTIZE*)
    offload_mode: str  # ACESTEP_OFFLOAD: none | auto | modules
    offload_active: bool  # the modules wait on the CPU and move in to run
