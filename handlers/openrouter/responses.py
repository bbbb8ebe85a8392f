"""Upstream's response shapes: the chat completion, its stream chunks, the text and the audio."""
from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, Optional

from engine.types import CONTENT_TYPES
from service.ports import BlobStore
from service.records import TaskRecord, TaskResult

NO_LM_TEXT = "Music generated successfully."
DEMO_NOTE = ("Note: this server runs a random-weight demo model, so the audio is noise, not music.")
INSTRUMENTAL = ("[inst]", "[instrumental]")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _shown(value: Any) -> bool:
    return value not in (None, "", "N/A")


def content_text(record: TaskRecord, lm_fallback: bool = False) -> str:
    """Markdown: the metadata the song was made with, then its lyrics (upstream's `content`)."""
    result = record.result or TaskResult()
    info, metas, request = result.generation_info, result.metas, record.request
    lines = []
    caption = info.get("caption") or request.prompt
    for label, value, unit in (("Caption", caption, ""), ("BPM", metas.bpm, ""),
                               ("Duration", metas.duration, "s"), ("Key", metas.key_scale, ""),
                               ("Time Signature", metas.time_signature, ""),
                               ("Language", request.vocal_language, "")):
        if _shown(value):
            lines.append(f"**{label}:** {value}{unit}")
    parts = ["## Metadata\n" + "\n".join(lines)] if lines else []
    # the lyrics the LM wrote (analysis, or sample/format mode), else the request's
    lyrics = str(info.get("lyrics") or info.get("lm_lyrics") or request.lyrics or "").strip()
    if lyrics and lyrics.lower() not in INSTRUMENTAL:
        parts.append(f"## Lyrics\n{lyrics}")
    notes = []
    if result.random_weights:
        notes.append(DEMO_NOTE)
    if lm_fallback:
        notes.append("Note: no 5 Hz LM runs on this server, so your description was used as the caption "
                     "(sample mode needs the LM).")
    text = "\n\n".join(parts) if parts else NO_LM_TEXT
    return "\n\n".join([text, *notes])


def audio_items(record: TaskRecord, blobs: BlobStore) -> list[dict[str, Any]]:
    """Every generated file as a base64 data URL (blocking: reads the blob store)."""
    items = []
    for audio in (record.result.audios if record.result else []):
        data = base64.b64encode(blobs.get(audio.key)).decode("ascii")
        items.append({"type": "audio_url",
                      "audio_url": {"url": f"data:{CONTENT_TYPES.get(audio.format, 'audio/mpeg')};base64,{data}"}})
    return items


def completion(cid: str, model: str, content: str, audio: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "audio": audio},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class Chunks:
    """`data: {chat.completion.chunk}\\n\\n` lines of one streamed completion."""

    def __init__(self, cid: str, model: str):
        self.cid, self.model, self.created = cid, model, int(time.time())

    def chunk(self, *, role: Optional[str] = None, content: Optional[str] = None,
              audio: Optional[list[dict[str, Any]]] = None, finish_reason: Optional[str] = None) -> str:
        delta: dict[str, Any] = {}
        if role is not None:
            delta["role"] = role
        if content is not None:
            delta["content"] = content
        if audio is not None:
            delta["audio"] = audio
        body = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    DONE = "data: [DONE]\n\n"


__all__ = ["Chunks", "audio_items", "completion", "completion_id", "content_text"]
