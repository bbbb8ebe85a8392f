"""The validated generation request: the contract between the service and the engine.

This module is deliberately free of torch/diffusers so the API (and the Lambda package) can
validate requests at submit time without loading the engine. Every range here is enforced at
submit time, so a request that reaches a worker is known to be well-formed.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TASK_TYPES = ("text2music", "cover", "repaint", "lego", "extract", "complete")
AUDIO_FORMATS = ("mp3", "wav", "flac", "opus", "aac", "wav32")  # wav32: 32-bit float WAV
TRACK_NAMES = (
    "woodwinds", "brass", "fx", "synth", "strings", "percussion",
    "keyboard", "guitar", "bass", "drums", "backing_vocals", "vocals",
)
TIME_SIGNATURES = ("", "2", "3", "4", "6")
MAX_AUDIO_CODE = 63999
MAX_AUDIO_CODES = 600 * 5  # 5 Hz codes for the longest song (600 s)
MAX_BATCH = 8

# Validation context key: the audio roles ("src_audio", "reference_audio") a request being
# submitted has a source for whose blob key is only written at submission (a file to store).
DECLARED_SOURCES = "declared_sources"
NEEDS_SOURCE = ("cover", "repaint", "lego", "extract", "complete")

_AUDIO_CODE_RE = re.compile(r"<\|audio_code_(\d+)\|>")

# LoRA/LoKr adapters: a name is also what its file or folder under ACESTEP_LORA_DIR is called.
ADAPTER_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_ADAPTERS = 4  # stacked in one request
ADAPTER_SCALE_MIN, ADAPTER_SCALE_MAX = -2.0, 2.0


def parse_audio_codes(text: str) -> list[int]:
    """Parse 5 Hz audio codes given as `<|audio_code_N|>` tokens or as plain integers.

    Raises ValueError with a message fit for a client when the text is neither.
    """
    text = text.strip()
    if not text:
        return []
    tokens = _AUDIO_CODE_RE.findall(text)
    if tokens:
        leftover = _AUDIO_CODE_RE.sub("", text).strip()
        if leftover:
            raise ValueError("mixes <|audio_code_N|> tokens with other text")
        codes = [int(t) for t in tokens]
    else:
        parts = [p for p in re.split(r"[\s,]+", text) if p]
        if not all(p.isdigit() for p in parts):
            raise ValueError("must be <|audio_code_N|> tokens or integers separated by commas/spaces")
        codes = [int(p) for p in parts]
    if len(codes) > MAX_AUDIO_CODES:
        raise ValueError(f"at most {MAX_AUDIO_CODES} codes (600 s at 5 Hz), got {len(codes)}")
    bad = [c for c in codes if c > MAX_AUDIO_CODE]
    if bad:
        raise ValueError(f"codes must be 0-{MAX_AUDIO_CODE}, got {bad[0]}")
    return codes


def format_audio_codes(codes: list[int]) -> str:
    return "".join(f"<|audio_code_{c}|>" for c in codes)


class AdapterRef(BaseModel):
    """One adapter applied to the DiT for this request, at a scale (0: as if absent, bit for bit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=ADAPTER_NAME_RE)
    scale: float = Field(1.0, ge=ADAPTER_SCALE_MIN, le=ADAPTER_SCALE_MAX)
    # Set only for an uploaded adapter (by the API): the sha256 of its stored bytes, which the worker fetches.
    # None: a file under the worker's ACESTEP_LORA_DIR.
    sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")


class GenerationRequest(BaseModel):
    """One music generation task, after alias resolution and type coercion."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What to make
    task_type: Literal["text2music", "cover", "repaint", "lego", "extract", "complete"] = "text2music"
    prompt: str = Field("", max_length=4096)
    lyrics: str = Field("", max_length=16384)
    instruction: Optional[str] = Field(None, max_length=1024)
    # json_schema_extra: what the validators below allow, for the API schema (canonical spellings)
    track_name: Optional[str] = Field(None, json_schema_extra={"enum": [None, "", *TRACK_NAMES]})  # lego / extract
    complete_track_classes: Optional[list[str]] = Field(  # complete
        None, json_schema_extra={"items": {"type": "string", "enum": list(TRACK_NAMES)}})
    model: Optional[str] = None

    # Musical metadata
    bpm: Optional[int] = Field(None, ge=30, le=300)
    key_scale: str = Field("", max_length=64)
    time_signature: str = Field("", json_schema_extra={"enum": [*TIME_SIGNATURES, "2/4", "3/4", "4/4", "6/8"]})
    audio_duration: Optional[float] = Field(None, ge=10, le=600, description=(
        "seconds; none: the source's length, the audio codes' length, the 5 Hz LM's choice when it runs, "
        "else 120 s (upstream's default)"))
    vocal_language: str = Field("en", max_length=16)

    # Diffusion
    inference_steps: int = Field(8, ge=1, le=200)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    shift: float = Field(3.0, ge=1.0, le=5.0)
    infer_method: Literal["ode", "sde"] = "ode"
    timesteps: Optional[list[float]] = Field(None, json_schema_extra={
        "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "maxItems": 200})
    # upstream's sampler options: heun is second order (two DiT evaluations a step); engine/sampler.py
    sampler_mode: Literal["euler", "heun"] = "euler"
    # upstream's velocity controls (0: off): scale each item's velocity to at most this many times its latents'
    # norm; blend each step's velocity with the previous one's by this factor
    velocity_norm_threshold: float = Field(0.0, ge=0.0, le=100.0)
    velocity_ema_factor: float = Field(0.0, ge=0.0, le=1.0)
    # upstream's post-processing of the final latents, before the VAE decodes them: latents * rescale + shift
    latent_shift: float = Field(0.0, ge=-10.0, le=10.0)
    latent_rescale: float = Field(1.0, gt=0.0, le=10.0)  # 0 would decode a constant latent: silence
    cfg_interval_start: float = Field(0.0, ge=0.0, le=1.0)
    cfg_interval_end: float = Field(1.0, ge=0.0, le=1.0)
    use_adg: bool = False
    use_tiled_decode: bool = True

    # Batch and seeds
    batch_size: int = Field(2, ge=1, le=MAX_BATCH)
    use_random_seed: bool = True
    seeds: Optional[list[int]] = Field(None, json_schema_extra={  # explicit seeds; always honoured when given
        "items": {"type": "integer", "minimum": -1, "maximum": 2**32 - 1}, "minItems": 1, "maxItems": 64})

    # Source / reference audio: opaque blob keys resolved by the worker, never client paths
    src_audio_key: Optional[str] = None
    reference_audio_key: Optional[str] = None
    audio_cover_strength: float = Field(1.0, ge=0.0, le=1.0)
    # upstream's: a cover starts from its source renoised (0: pure noise, 1: closest to the source); engine/cover_start.py
    cover_noise_strength: float = Field(0.0, ge=0.0, le=1.0)
    repainting_start: float = Field(0.0, ge=-600.0, le=600.0)
    repainting_end: Optional[float] = Field(None, le=1200.0)

    # 5 Hz conditioning codes supplied by the client (or the LM planner)
    audio_code_string: str = Field("", json_schema_extra={  # also <|audio_code_N|> tokens
        "pattern": r"^([0-9]{1,4}(,[0-9]{1,4})*)?$", "maxLength": MAX_AUDIO_CODES * 5})

    # LoRA/LoKr adapters on the DiT for this request only (stacked in order); [] = none
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=MAX_ADAPTERS)

    # Output
    audio_format: Literal["mp3", "wav", "flac", "opus", "aac", "wav32"] = "mp3"

    # 5 Hz LM planner (the LM issue consumes these; the DiT engine ignores them)
    thinking: bool = False
    sample_mode: bool = False
    sample_query: str = Field("", max_length=4096)
    use_format: bool = False
    analysis_only: bool = False
    full_analysis_only: bool = False
    lm_model_path: Optional[str] = Field(None, max_length=512)
    lm_backend: Literal["vllm", "pt", "mlx"] = "vllm"
    lm_temperature: float = Field(0.85, ge=0.0, le=2.0)
    lm_cfg_scale: float = Field(2.5, ge=0.0, le=10.0)
    lm_top_k: Optional[int] = Field(None, ge=0, le=1000)
    lm_top_p: float = Field(0.9, ge=0.0, le=1.0)
    lm_repetition_penalty: float = Field(1.0, ge=0.5, le=2.0)
    lm_negative_prompt: str = Field("NO USER INPUT", max_length=4096)
    constrained_decoding: bool = True
    constrained_decoding_debug: bool = False
    use_cot_caption: bool = True
    use_cot_language: bool = True
    is_format_caption: bool = False
    allow_lm_batch: bool = True

    @field_validator("time_signature")
    @classmethod
    def _time_signature(cls, v: str) -> str:
        v = v.strip()
        if v.lower() in ("auto", "n/a"):  # upstream's "let the model decide"
            return ""
        beats, slash, unit = v.partition("/")
        if slash and unit.strip() in ("2", "4", "8"):  # "3/4" -> "3", "6/8" -> "6" (beats per bar)
            v = beats.strip()
        if v not in TIME_SIGNATURES:
            raise ValueError("must be one of 2, 3, 4, 6 (or written as 2/4, 3/4, 4/4, 6/8)")
        return v

    @field_validator("track_name")
    @classmethod
    def _track_name(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v == "":
            return None
        name = v.strip().lower()
        if name not in TRACK_NAMES:
            raise ValueError(f"must be one of {', '.join(TRACK_NAMES)}")
        return name

    @field_validator("complete_track_classes")
    @classmethod
    def _track_classes(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if not v:
            return None
        names = [s.strip().lower() for s in v if s.strip()]
        bad = [n for n in names if n not in TRACK_NAMES]
        if bad:
            raise ValueError(f"unknown track {bad[0]!r}; must be among {', '.join(TRACK_NAMES)}")
        return names

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is None:
            return None
        # -1 means "random" for that item, as upstream; its position is kept.
        if any(s < -1 or s > 2**32 - 1 for s in v):
            raise ValueError("seeds must be 0-4294967295, or -1 for a random seed")
        return v if any(s >= 0 for s in v) else None

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v and len(v) > 1 and v[-1] == 0.0:  # upstream's schedules end with the final 0: implied here
            v = v[:-1]
        if not v:
            return None
        if len(v) > 200:
            raise ValueError("at most 200 timesteps")
        if any(not (0.0 < t <= 1.0) for t in v):
            raise ValueError("each timestep must be in (0, 1]")
        if any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError("timesteps must be strictly decreasing")
        return v

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: list[AdapterRef]) -> list[AdapterRef]:
        names = [a.name for a in v]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may be named once")
        return v

    @property
    def adapter_key(self) -> tuple[tuple[str, Optional[str], float], ...]:
        """What a batch must share: the adapters that act (scale 0 ones do nothing), in a canonical order."""
        return tuple(sorted((a.name, a.sha256, a.scale) for a in self.adapters if a.scale != 0.0))

    @field_validator("audio_code_string")
    @classmethod
    def _codes(cls, v: str) -> str:
        codes = parse_audio_codes(v)
        return format_audio_codes(codes)

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> "GenerationRequest":
        if self.cfg_interval_start > self.cfg_interval_end:
            raise ValueError("cfg_interval_start must be <= cfg_interval_end")
        end = self.repainting_end
        if end is not None and end > 0 and end <= self.repainting_start:
            raise ValueError("repainting_end must be greater than repainting_start (or <= 0 for the end of the source)")
        has_source = bool(self.src_audio_key) or "src_audio" in ((info.context or {}).get(DECLARED_SOURCES) or ())
        if self.task_type in NEEDS_SOURCE and not has_source \
                and not (self.task_type == "cover" and self.audio_code_string):
            raise ValueError(f"task_type {self.task_type!r} needs source audio (src_audio)")
        if self.cover_noise_strength > 0.0 and not (self.task_type == "cover" or (
                self.task_type == "text2music" and (self.audio_code_string or self.thinking))):
            raise ValueError(f"cover_noise_strength applies to cover only (or text2music from audio codes, which runs "
                             f"as a cover): it starts from the cover's source renoised (task_type {self.task_type!r} "
                             "has none to start from)")
        if self.full_analysis_only and not has_source:
            raise ValueError("full_analysis_only needs source audio (src_audio) to analyse")
        if self.task_type in ("lego", "extract") and not self.track_name and not self.instruction:
            raise ValueError(f"task_type {self.task_type!r} needs track_name (one of {', '.join(TRACK_NAMES)})")
        if self.task_type == "complete" and not self.complete_track_classes and not self.instruction:
            raise ValueError("task_type 'complete' needs complete_track_classes")
        return self

    @property
    def needs_lm(self) -> bool:
        """Features that cannot run without the 5 Hz LM (thinking alone degrades to DiT-only)."""
        return self.sample_mode or bool(self.sample_query) or self.use_format \
            or self.analysis_only or self.full_analysis_only
