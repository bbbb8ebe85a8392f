"""Engine-side result types (torch-free, so the service can type against them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


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


@dataclass
class GenerationResult:
    audios: list[EncodedAudio]
    # metas as the API reports them: bpm, duration, genres, keyscale, timesignature ("N/A" when unknown)
    metas: dict
    dit_model: str
    lm_model: str
    # what ran and how long each stage took; includes random_weights when the model is a demo
    generation_info: dict = field(default_factory=dict)
    # Asked for with encode=False: the audio still to encode, in order (then `audios` is empty).
    pending: list[PendingAudio] = field(default_factory=list)


@dataclass
class ModelInfo:
    name: str
    is_default: bool
    random_weights: bool  # a demo checkpoint: its audio is noise
    task_types: tuple[str, ...] = ()
    path: Optional[str] = None
