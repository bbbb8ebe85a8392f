"""What the chat messages ask for: a caption, lyrics, a sample query, and input audio.

Upstream's modes: `<prompt>…</prompt>` / `<lyrics>…</lyrics>` tags; text that looks like lyrics
(section markers such as [Verse], or four or more short lines); anything else is a natural
language description for the LM's sample mode. Only the last user message counts (earlier turns
of a chat are history); its `input_audio` parts are decoded here, so a bad one is a 400.
"""
from __future__ import annotations

import base64
import binascii
import string
from dataclasses import dataclass, field
from typing import Optional

from .schema import ChatMessage

_TAGS = ("prompt", "lyrics")
# Lower-cases A-Z only, so indices in the lowered copy are indices in the text (str.lower() can
# change a string's length: "İ" becomes two characters).
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# base64 is decoded in slices of this many characters (a multiple of 4): one C call holds the GIL,
# and a 67 MB string in one call would hold it for a fifth of a second.
_B64_SLICE = 4 * 1024 * 1024
_SECTION_MARKERS = ("[verse", "[chorus", "[bridge", "[intro", "[outro", "[hook", "[pre-chorus", "[refrain", "[inst")
AUDIO_FORMATS = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg",
                 "m4a": "audio/mp4", "aac": "audio/aac", "opus": "audio/ogg", "webm": "audio/webm"}


class MessageError(ValueError):
    """A message the API cannot use; the text is the 400's detail."""


@dataclass
class InputAudioFile:
    data: bytes
    format: str

    @property
    def content_type(self) -> str:
        return AUDIO_FORMATS.get(self.format, "application/octet-stream")


@dataclass
class ParsedMessages:
    prompt: str = ""
    lyrics: str = ""
    sample_query: str = ""  # set when the text is a description for the LM (no tags, no lyrics)
    tagged: bool = False
    audios: list[InputAudioFile] = field(default_factory=list)


def looks_like_lyrics(text: str) -> bool:
    lowered = text.lower()
    if any(marker in lowered for marker in _SECTION_MARKERS):
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 4 and sum(len(line) for line in lines) / len(lines) < 60


def find_tagged(text: str, lowered: str, name: str) -> Optional[tuple[int, int]]:
    """(start, end) of the first `<name>…</name>` in `text` (tags in any ASCII case), or None.

    The first opening tag, then the first closing tag after it: two linear scans. (A lazy regex
    retried from every opening tag is quadratic: 250 KB of "<prompt>" took 73 s.) `lowered` is
    `text.translate(_ASCII_LOWER)`, made once per text.
    """
    opening, closing = f"<{name}>", f"</{name}>"
    start = lowered.find(opening)
    if start < 0:
        return None
    end = lowered.find(closing, start + len(opening))
    return None if end < 0 else (start, end + len(closing))


def _b64decode(payload: str) -> bytes:
    if len(payload) % 4:
        raise binascii.Error("incorrect padding")
    return b"".join(base64.b64decode(payload[i:i + _B64_SLICE], validate=True)
                    for i in range(0, len(payload), _B64_SLICE))


def _decode_audio(part_data: str, fmt: str, index: int, max_bytes: int) -> InputAudioFile:
    label = f"input_audio #{index + 1}"
    payload = part_data.split(",", 1)[1] if part_data.startswith("data:") and "," in part_data else part_data
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise MessageError(f"{label}: too large: the limit is {max_bytes // 2**20} MB")
    try:
        data = _b64decode(payload)
    except (binascii.Error, ValueError):
        raise MessageError(f"{label}: data must be base64-encoded audio") from None
    if not data:
        raise MessageError(f"{label}: data is empty")
    return InputAudioFile(data, (fmt or "mp3").strip().lower().lstrip("."))


def parse_messages(messages: list[ChatMessage], max_audio_bytes: int) -> ParsedMessages:
    user = next((m for m in reversed(messages) if m.role == "user"), None)
    if user is None:
        raise MessageError("messages: no user message")
    out = ParsedMessages()
    texts: list[str] = []
    if isinstance(user.content, str):
        texts.append(user.content)
    for part in user.content if isinstance(user.content, list) else ():
        if part.type == "text" and part.text:
            texts.append(part.text)
        elif part.type == "input_audio" and part.input_audio is not None:
            out.audios.append(_decode_audio(part.input_audio.data, part.input_audio.format, len(out.audios),
                                            max_audio_bytes))
    prompt_parts: list[str] = []
    for text in (t.strip() for t in texts):
        lowered = text.translate(_ASCII_LOWER)
        tagged = {name: find_tagged(text, lowered, name) for name in _TAGS}
        if any(tagged.values()):
            out.tagged = True
            rest = text
            for name, span in tagged.items():
                if span is None:
                    continue
                start, end = span
                rest = rest.replace(text[start:end], "")
                inner = text[start + len(name) + 2:end - len(name) - 3].strip()
                if name == "prompt" and inner:
                    prompt_parts.append(inner)
                elif name == "lyrics" and inner:
                    out.lyrics = inner
            if rest.strip():
                prompt_parts.append(rest.strip())
        elif looks_like_lyrics(text):
            out.lyrics = text
        elif text:
            prompt_parts.append(text)
    out.prompt = " ".join(prompt_parts).strip()
    if not out.tagged and not out.lyrics and out.prompt:  # a description: the LM writes the song
        out.sample_query, out.prompt = out.prompt, ""
    return out


__all__ = ["InputAudioFile", "MessageError", "ParsedMessages", "find_tagged", "looks_like_lyrics", "parse_messages"]
