"""Data the 5 Hz LM planner takes and returns (torch-free)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from engine.lm.constraints import ConstraintTables, TokenConstraint
from engine.lm.vocab import LMVocab
from engine.request import GenerationRequest, format_audio_codes


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.85
    top_k: Optional[int] = None  # None or 0: off
    top_p: Optional[float] = None  # None, 0 or >= 1: off
    repetition_penalty: float = 1.0
    cfg_scale: float = 1.0  # guidance runs only when > 1 (upstream)

    @property
    def cfg(self) -> bool:
        return self.cfg_scale > 1.0

    @classmethod
    def from_request(cls, r: GenerationRequest) -> "SamplingParams":
        return cls(temperature=r.lm_temperature, top_k=r.lm_top_k or None,
                   top_p=r.lm_top_p if 0.0 < r.lm_top_p < 1.0 else None,
                   repetition_penalty=r.lm_repetition_penalty, cfg_scale=r.lm_cfg_scale)

    def without_cfg(self) -> "SamplingParams":
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty, 1.0)


def checked_decode_args(n: int, seeds: Sequence[int], sampling: SamplingParams,
                        uncond_prompts: Optional[Sequence[Sequence[int]]],
                        constraints: Optional[Sequence[Optional[TokenConstraint]]]
                        ) -> tuple[Optional[Sequence[Sequence[int]]], list[Optional[TokenConstraint]]]:
    """LMBackend.generate's arguments for `n` prompts, checked alike by every backend: the unconditional
    prompts when CFG applies (else None) and one constraint (or None) per prompt."""
    if len(seeds) != n:
        raise ValueError("one seed per prompt")
    uncond = uncond_prompts if sampling.cfg else None
    if uncond is not None and len(uncond) != n:
        raise ValueError("one unconditional prompt per prompt")
    cons = list(constraints) if constraints is not None else [None] * n
    if len(cons) != n:
        raise ValueError("one constraint (or None) per prompt")
    return uncond, cons


@dataclass
class DecodeResult:
    """What one batched decode produced: per item, the generated ids without the stop token."""

    tokens: list[list[int]]
    stopped: list[bool]  # True: ended on a stop token; False: ran into max_new_tokens
    prompt_tokens: list[int]
    steps: int
    prefill_s: float
    decode_s: float
    constraint_s: float  # inside the constraint (allowed/advance) and the masking, part of decode_s
    rows: int  # forward batch rows (items x 2 with CFG)
    notes: list[str] = field(default_factory=list)  # e.g. that the items were decoded in groups, and why


StepCallback = Callable[[int], None]  # called after each decode step with the step count; may raise to stop


class LMBackend(Protocol):
    """A runtime that can decode for the planner: TransformersLM (pt) or VllmLM (vllm)."""

    name: str
    model_name: str
    vocab: LMVocab
    tables: ConstraintTables
    random_weights: bool
    dtype: str  # the weights' dtype ("bfloat16", "float32" ...), for describe() and generation_info
    max_context: int  # tokens one decoded sequence may span, prompt included (max_new_tokens is cut to fit)

    def encode(self, text: str) -> list[int]: ...

    def decode_text(self, ids: Sequence[int]) -> str: ...

    def generate(self, prompts: Sequence[Sequence[int]], *, seeds: Sequence[int], sampling: SamplingParams,
                 max_new_tokens: int, uncond_prompts: Optional[Sequence[Sequence[int]]] = None,
                 constraints: Optional[Sequence[Optional[TokenConstraint]]] = None,
                 stop_ids: Sequence[int] = (), on_step: Optional[StepCallback] = None) -> DecodeResult: ...


@dataclass
class PhaseStats:
    phase: str  # "sample", "format", "cot", "codes", "understand"
    items: int
    cfg: bool
    constrained: bool
    prompt_tokens: int  # conditional prompt, per item
    generated_tokens: list[int]  # per item, without the stop token
    steps: int
    seconds: float
    prefill_s: float
    decode_s: float
    constraint_s: float
    notes: list[str] = field(default_factory=list)  # the backend's (DecodeResult.notes)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.generated_tokens) / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = round(self.tokens_per_s, 1)
        for k in ("seconds", "prefill_s", "decode_s", "constraint_s"):
            d[k] = round(d[k], 4)
        return d


@dataclass
class LMPlan:
    """The planner's answer for one request.

    metadata: what the DiT should use (user values win, then the LM's): bpm, caption, duration, genres, keyscale,
    language, timesignature; absent keys are unknown. lm_metadata: what the LM wrote (sample/format/phase 1).
    caption/lyrics: the DiT's text (the CoT caption when use_cot_caption and phase 1 wrote one; the rewritten
    lyrics after sample/format). codes: one list per batch item (empty without phase 2). written_caption /
    written_lyrics: what sample or format mode wrote (before phase 1 rewrote the caption), None when neither ran:
    what upstream's results show as the song's prompt and lyrics.
    """

    metadata: dict[str, Any]
    lm_metadata: dict[str, Any]
    caption: str
    lyrics: str
    lyrics_rewritten: bool
    codes: list[list[int]]
    seeds: list[int]
    phases: list[PhaseStats] = field(default_factory=list)
    cot_text: str = ""  # the metadata block phase 2 was conditioned on
    lm_text: str = ""  # phase 1's (or sample/format's) raw output
    notes: list[str] = field(default_factory=list)
    model: str = ""
    backend: str = ""
    random_weights: bool = False
    dtype: str = ""  # the LM's weights' dtype
    written_caption: Optional[str] = None
    written_lyrics: Optional[str] = None

    @property
    def audio_code_strings(self) -> list[str]:
        """Per item, the `<|audio_code_N|>...` string `AceStepPipeline(audio_codes=...)` and
        `GenerationRequest.audio_code_string` take."""
        return [format_audio_codes(c) for c in self.codes]

    @property
    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.phases:  # a phase run item by item (allow_lm_batch=false) counts once, summed
            key = f"lm_{p.phase}_s"
            out[key] = round(out.get(key, 0.0) + p.seconds, 4)
        out["lm_total_s"] = round(sum(p.seconds for p in self.phases), 4)
        return out

    def info(self) -> dict:
        """For generation_info: what ran, on what, how long, with which tokens counts."""
        info = {
            "lm_model": self.model, "lm_backend": self.backend, "lm_random_weights": self.random_weights,
            "lm_dtype": self.dtype,
            "lm_metadata": self.lm_metadata, "lm_phases": [p.as_dict() for p in self.phases],
            "lm_codes_per_item": [len(c) for c in self.codes], "lm_notes": list(self.notes), **self.timings,
        }
        if self.written_caption is not None:
            info.update(lm_caption=self.written_caption, lm_lyrics=self.written_lyrics)
        return info
