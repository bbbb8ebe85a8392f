"""A chat completion request -> the ACE-Step request fields and files, then the shared validation.

The fields are what a /release_task body would hold, so `parse_release_task` validates them with
the same aliases, ranges and messages; the input audio becomes its multipart files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from handlers.body import FilePart
from handlers.request_parsing import ParsedTask, parse_release_task

from .messages import MessageError, ParsedMessages, parse_messages
from .schema import AudioConfig, ChatCompletionRequest

MODEL_PREFIX = "acestep/"
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")
# Set by this module from the request's own fields: extras may not override them.
_OWN = {"prompt", "caption", "lyrics", "sample_mode", "sample_query", "task_type", "model", "src_audio",
        "reference_audio", "src_audio_path", "reference_audio_path", "src_audio_key", "reference_audio_key",
        "ai_token", "idempotency_key", "param_obj", "metas", "metadata", "webhook_url"}


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
    """Raises MessageError (a 400) for unusable messages; parse_release_task raises the 400 of a bad value."""
    msgs = parse_messages(req.messages, max_audio_bytes)
    prompt, lyrics, query = msgs.prompt, msgs.lyrics, msgs.sample_query
    text = prompt or query
    if req.lyrics:  # lyrics given directly: the message text describes the music
        prompt, lyrics, query = text, req.lyrics, ""
    elif req.sample_mode:  # the message text is the LM's query
        prompt, lyrics, query = "", "", text
    if not (prompt or lyrics or query or msgs.audios or req.sample_mode):
        raise MessageError("no prompt, lyrics, sample query or input audio found in the messages")
    guessed_query = bool(query) and not req.sample_mode
    config = req.audio_config or AudioConfig()
    fields: dict[str, Any] = {k: v for k, v in (req.model_extra or {}).items() if k not in _OWN}
    fields.update({
        "prompt": prompt, "lyrics": lyrics, "sample_query": query, "sample_mode": req.sample_mode or bool(query),
        "task_type": req.task_type, "model": model_name(req.model, model_names),
        "thinking": req.thinking, "use_format": req.use_format, "use_cot_caption": req.use_cot_caption,
        "use_cot_language": req.use_cot_language, "lm_temperature": req.temperature, "lm_top_p": req.top_p,
        "lm_top_k": req.top_k, "guidance_scale": req.guidance_scale,
        "batch_size": req.batch_size if req.batch_size is not None else 1,  # upstream's chat default
        "seed": req.seed, "repainting_start": req.repainting_start, "repainting_end": req.repainting_end,
        "audio_cover_strength": req.audio_cover_strength,
        "audio_duration": config.duration, "bpm": config.bpm, "key_scale": config.key_scale,
        "time_signature": config.time_signature, "vocal_language": config.vocal_language,
        "audio_format": config.format, "instrumental": config.instrumental,
    })
    if fields["audio_format"] is None:
        fields.pop("audio_format")
    files = _route_audio(msgs, req.task_type)
    parsed = parse_release_task(fields, files, model_names=model_names)
    name = parsed.request.model or default_model or ""
    return ChatTask(parsed, msgs, MODEL_PREFIX + name, guessed_query)


def _route_audio(msgs: ParsedMessages, task_type: str) -> dict[str, FilePart]:
    """Upstream's routing: editing tasks take audio[0] as the source and audio[1] as the style
    reference; text2music takes audio[0] as the reference."""
    roles = ("src_audio", "reference_audio") if task_type.strip().lower() in SOURCE_TASKS else ("reference_audio",)
    files = {}
    for role, audio in zip(roles, msgs.audios):
        files[role] = FilePart(audio.data, f"input.{audio.format}", audio.content_type)
    return files


__all__ = ["ChatTask", "MODEL_PREFIX", "MessageError", "model_name", "to_task"]
