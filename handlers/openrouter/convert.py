"""A chat completion request -> canonical ACE-Step request values and audio sources, then the shared validation.

Each value is put under its canonical name with where the chat body had it ("audio_config.duration",
"temperature"), so `validate_canonical` checks it with /release_task's ranges and messages and names it
as the client sent it; other ACE-Step fields pass through as extras under upstream's names
(handlers/aliases.resolve); the input audio becomes the sent files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from handlers.aliases import Loc, resolve
from handlers.request_parsing import ParsedTask, validate_canonical
from service.sources import AudioSource, SentFile
from service.submission import Upload

from .messages import MessageError, ParsedMessages, parse_messages
from .schema import AudioConfig, ChatCompletionRequest

MODEL_PREFIX = "acestep/"
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")
# Set by this module from the request's own fields: extras may not override them.
_OWN = {"prompt", "caption", "lyrics", "sample_mode", "sample_query", "task_type", "model", "src_audio",
        "reference_audio", "src_audio_path", "reference_audio_path", "src_audio_key", "reference_audio_key",
        "ai_token", "idempotency_key", "param_obj", "metas", "metadata", "webhook_url"}
_SOURCES = ("src_audio_key", "src_audio_path", "reference_audio_key", "reference_audio_path")


@dataclass
class ChatTask:
    parsed: ParsedTask
    messages: ParsedMessages
    model_id: str  # as the response names it: "acestep/<model>"
    # The sample query was guessed from a description (sample mode not asked for): without an LM on the
    # workers, the description is the caption instead (service/submitter.py decides, asking the fleet once).
    guessed_query: bool


def model_name(model_id: Optional[str], model_names: Sequence[str]) -> Optional[str]:
    """The served model a chat `model` names, else None (the default model runs), as upstream takes any id:
    "acestep/acestep-v15-turbo" -> "acestep-v15-turbo"; the cloud's "acemusic/acestep-v1.5-turbo" is the
    same model spelt with the version's dot; "gpt-4o", "" or None -> None."""
    name = (model_id or "").strip().rsplit("/", 1)[-1]
    for candidate in (name, name.replace(".", "")):
        if candidate and candidate in model_names:
            return candidate
    return None


def to_task(req: ChatCompletionRequest, *, model_names: Sequence[str], default_model: Optional[str],
            max_audio_bytes: int) -> ChatTask:
    """Raises MessageError (a 400) for unusable messages; validate_canonical raises the 400 of a bad value."""
    msgs = parse_messages(req.messages, max_audio_bytes)
    prompt, lyrics, query = msgs.prompt, msgs.lyrics, msgs.sample_query
    text = prompt or query
    lyrics_from: Loc = ("messages",)
    if req.lyrics:  # lyrics given directly: the message text describes the music
        prompt, lyrics, query, lyrics_from = text, req.lyrics, "", ("lyrics",)
    elif req.sample_mode:  # the message text is the LM's query
        prompt, lyrics, query = "", "", text
    if not (prompt or lyrics or query or msgs.audios or req.sample_mode):
        raise MessageError("no prompt, lyrics, sample query or input audio found in the messages")
    guessed_query = bool(query) and not req.sample_mode
    config = req.audio_config or AudioConfig()
    try:  # other ACE-Step fields under upstream's names (not param_obj/metas: _OWN); audio only from messages
        canonical = resolve({k: v for k, v in (req.model_extra or {}).items() if k not in _OWN})
    except ValueError as exc:
        raise MessageError(str(exc)) from None
    for source in _SOURCES:
        canonical.pop(source)
    own: dict[str, tuple[Any, Loc]] = {
        "prompt": (prompt, ("messages",)), "lyrics": (lyrics, lyrics_from), "sample_query": (query, ("messages",)),
        "sample_mode": (req.sample_mode or bool(query), ("sample_mode",)), "task_type": (req.task_type, ("task_type",)),
        "model": (model_name(req.model, model_names), ("model",)),
        "thinking": (req.thinking, ("thinking",)), "use_format": (req.use_format, ("use_format",)),
        "use_cot_caption": (req.use_cot_caption, ("use_cot_caption",)),
        "use_cot_language": (req.use_cot_language, ("use_cot_language",)),
        "lm_temperature": (req.temperature, ("temperature",)), "lm_top_p": (req.top_p, ("top_p",)),
        "lm_top_k": (req.top_k, ("top_k",)), "guidance_scale": (req.guidance_scale, ("guidance_scale",)),
        "batch_size": (req.batch_size if req.batch_size is not None else 1, ("batch_size",)),  # upstream's chat default
        "seeds": (req.seed, ("seed",)), "repainting_start": (req.repainting_start, ("repainting_start",)),
        "repainting_end": (req.repainting_end, ("repainting_end",)),
        "audio_cover_strength": (req.audio_cover_strength, ("audio_cover_strength",)),
        **{name: (getattr(config, attr), ("audio_config", attr)) for name, attr in (
            ("audio_duration", "duration"), ("bpm", "bpm"), ("key_scale", "key_scale"),
            ("time_signature", "time_signature"), ("vocal_language", "vocal_language"), ("audio_format", "format"),
            ("instrumental", "instrumental"))},
    }
    for name, (value, origin) in own.items():
        if value is None:  # not given: an extra under an alias may say it, else the default
            continue
        canonical.pop(name)
        canonical.put(name, value, origin)
    sources = _route_audio(msgs, req.task_type)
    request = validate_canonical(canonical, sources, model_names=model_names)
    name = request.model or default_model or ""
    return ChatTask(ParsedTask(request, tuple(sources)), msgs, MODEL_PREFIX + name, guessed_query)


def _route_audio(msgs: ParsedMessages, task_type: str) -> list[AudioSource]:
    """Upstream's routing: editing tasks take audio[0] as the source and audio[1] as the style
    reference; text2music takes audio[0] as the reference."""
    roles = ("src_audio", "reference_audio") if task_type.strip().lower() in SOURCE_TASKS else ("reference_audio",)
    return [SentFile(role, Upload(audio.data, f"input.{audio.format}", audio.content_type), role)
            for role, audio in zip(roles, msgs.audios)]


__all__ = ["ChatTask", "MODEL_PREFIX", "MessageError", "model_name", "to_task"]
