"""The body of POST /v1/chat/completions, as upstream's OpenRouter API documents it.

Lenient where chat clients differ (extra fields kept, `model` optional), strict on types: each
generation value is validated later by the ACE-Step API's own rules (handlers.fields), so a bad
value gets the same 400 on both APIs.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bounds on what a chat body may hold, far above any valid request: a caption is at most 4,096
# characters and lyrics 16,384 (engine.request.GenerationRequest). Beyond them: a 400 at once,
# before any parsing of the text.
MAX_TEXT_CHARS = 32 * 1024
MAX_MESSAGES = 256
MAX_PARTS = 16
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: str = Field(..., description="base64 audio (a data: URL prefix is accepted)")
    format: str = Field("mp3", max_length=16)


class ContentPart(BaseModel):
    """A multimodal part: {"type": "text", "text"} or {"type": "input_audio", "input_audio"}."""
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[Text] = None
    input_audio: Optional[InputAudio] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None

    @field_validator("content", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        """Refuse an oversized message with one clear reason (the union would name both branches)."""
        if isinstance(value, list):
            if len(value) > MAX_PARTS:
                raise ValueError(f"at most {MAX_PARTS} content parts per message (got {len(value)})")
            texts = [part.get("text") for part in value if isinstance(part, dict)]
        else:
            texts = [value]
        for text in texts:
            if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"a message's text must be at most {MAX_TEXT_CHARS} characters (got {len(text)}); "
                                 "a caption is at most 4096 and lyrics 16384")
        return value


class AudioConfig(BaseModel):
    """Values are checked as the ACE-Step API checks them (duration 10-600 or 0/-1 for auto, ...)."""
    model_config = ConfigDict(extra="ignore")
    duration: Any = Field(default=None, description="seconds, 10-600; none, 0 or -1: the 5 Hz LM chooses when "
                                                    "it runs, else 120 s (upstream's default)")
    bpm: Any = None
    vocal_language: Any = None
    instrumental: Optional[bool] = None
    format: Any = None
    key_scale: Any = None
    time_signature: Any = None


class ChatCompletionRequest(BaseModel):
    # Other ACE-Step request fields (inference_steps, shift, infer_method, ...) pass through as extras.
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = Field(None, max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    audio_config: Optional[AudioConfig] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Union[int, str, list[int], None] = None
    lyrics: Text = ""
    sample_mode: bool = False
    thinking: Optional[bool] = None
    use_format: Optional[bool] = None
    use_cot_caption: Optional[bool] = None
    use_cot_language: Optional[bool] = None
    guidance_scale: Optional[float] = None
    batch_size: Optional[int] = None
    task_type: str = "text2music"
    repainting_start: Optional[float] = None
    repainting_end: Optional[float] = None
    audio_cover_strength: Optional[float] = None


__all__ = ["MAX_MESSAGES", "MAX_PARTS", "MAX_TEXT_CHARS", "AudioConfig", "ChatCompletionRequest", "ChatMessage", "ContentPart", "InputAudio"]
