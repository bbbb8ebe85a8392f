"""Upstream's response shapes: the chat completion, its stream chunks, the text and the audio."""
from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from engine.types import CONTENT_TYPES
from service.ports import BlobStore
from service.records import TaskRecord, TaskResult

NO_LM_TEXT = "Music generated successfully."
DEMO_NOTE = ("Note: this server runs a random-weight demo model, so the audio is noise, not music.")
INSTRUMENTAL = ("[inst]", "[instrumental]")
log = logging.getLogger(__name__)


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


# Raw bytes per base64 piece: a multiple of 3, so the pieces join into one base64 text.
B64_PIECE = 3 * 2**20
GONE, STORE_FAILED = 410, 503  # a file of the answer is not stored (expired, deleted) / the store failed


@dataclass(frozen=True)
class AudioProblem:
    """Why the answer's audio cannot be read: the HTTP status it means and a sentence for the client."""
    status: int
    detail: str


def _problem(key: str, exc: Optional[BaseException]) -> AudioProblem:
    if exc is None or isinstance(exc, KeyError):
        return AudioProblem(GONE, f"the generated audio {key} is no longer stored (expired or deleted)")
    log.warning("reading %s from the blob store failed", key, exc_info=exc)
    return AudioProblem(STORE_FAILED, f"the generated audio {key} could not be read from storage "
                                      f"({type(exc).__name__}); retry shortly")


def audio_problem(record: TaskRecord, blobs: BlobStore) -> Optional[AudioProblem]:
    """Whether every audio file of the record is in the store (blocking: asks the store, reads nothing), so
    that an answer whose headers are sent before its audio is read can still fail with a status."""
    for audio in record.result.audios if record.result else []:
        try:
            if blobs.size(audio.key) is None:
                return _problem(audio.key, None)
        except Exception as exc:  # the store's own failure (S3, disk): the client is told, not given a 500
            return _problem(audio.key, exc)
    return None


def _audio_list(record: TaskRecord, blobs: BlobStore, failed: list[AudioProblem]) -> Iterator[str]:
    """The JSON of the `audio` list, every generated file as a base64 data URL, in pieces (blocking: reads
    the blob store). One file is held at a time: a whole response built at once (8 songs of 600 s wav32
    are 1.8 GB, 2.5 GB as base64) held three copies of it, for one request. A file that cannot be read
    (gone since audio_problem looked) ends the list there, still valid JSON, and is put in `failed`."""
    yield "["
    for i, audio in enumerate(record.result.audios if record.result else []):
        try:
            data = blobs.get(audio.key)
        except Exception as exc:
            failed.append(_problem(audio.key, exc))
            break
        yield (", " if i else "") + ('{"type": "audio_url", "audio_url": {"url": "data:'
                                     f'{CONTENT_TYPES.get(audio.format, "audio/mpeg")};base64,')
        for start in range(0, len(data), B64_PIECE):
            yield base64.b64encode(data[start:start + B64_PIECE]).decode("ascii")
        del data
        yield '"}}'
    yield "]"


def _around(value: dict[str, Any], slot: str, **dumps: Any) -> tuple[str, str]:
    """`value` as JSON, split where the string `slot` stands in it. `slot` is a fresh random string each
    time, so no text a client wrote can stand for it."""
    before, after = json.dumps(value, **dumps).split(json.dumps(slot, **dumps), 1)
    return before, after


def has_audio(record: TaskRecord) -> bool:
    return bool(record.result and record.result.audios)


def completion_parts(cid: str, model: str, content: str, record: TaskRecord, blobs: BlobStore) -> Iterator[str]:
    """The chat completion's JSON in pieces (a StreamingResponse body), audio included. The route has checked
    the files are there (audio_problem); one lost after that still ends in valid JSON: the audio read so far,
    finish_reason "error" and an OpenAI-style `error` saying which file and why."""
    if not has_audio(record):
        yield json.dumps(completion(cid, model, content, None))
        return
    slot = uuid.uuid4().hex
    value = completion(cid, model, content, slot)
    before, after = _around(value, slot)
    yield before
    failed: list[AudioProblem] = []
    yield from _audio_list(record, blobs, failed)
    if failed:  # keys after the audio only, so `before` is unchanged
        value["choices"][0]["finish_reason"] = "error"
        value["error"] = {"message": failed[0].detail, "code": failed[0].status}
        after = _around(value, slot)[1]
    yield after


def completion(cid: str, model: str, content: str, audio: Any) -> dict[str, Any]:
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
        return f"data: {json.dumps(self._body(delta, finish_reason), ensure_ascii=False)}\n\n"

    def _body(self, delta: dict[str, Any], finish_reason: Optional[str]) -> dict[str, Any]:
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def audio_chunk(self, record: TaskRecord, blobs: BlobStore, failed: list[AudioProblem]) -> Iterator[str]:
        """chunk(audio=[...]) with the record's audio, in pieces (see completion_parts). A file that cannot be
        read ends the list there (the chunk stays one well-formed line) and goes into `failed`, for the
        route's error chunk."""
        slot = uuid.uuid4().hex
        before, after = _around(self._body({"audio": slot}, None), slot, ensure_ascii=False)
        yield "data: " + before
        yield from _audio_list(record, blobs, failed)
        yield after + "\n\n"

    DONE = "data: [DONE]\n\n"


__all__ = ["AudioProblem", "Chunks", "audio_problem", "completion", "completion_id", "completion_parts", "content_text", "has_audio"]
