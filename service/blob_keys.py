"""Every blob key format, its builder and its parser: the one place that knows key layouts.

    uploads/pending/<32 hex>/<name>      a direct upload (POST /v1/uploads) not yet used by a task
    uploads/<task_id>/<role>[.<ext>]     source/reference audio a task owns (multipart, server file)
    outputs/<task_id>/<attempt>-<i>.<ext>  a generated file (ext: its format's, wav32 is .wav); the
                                         attempt keeps a fenced-out
                                         duplicate worker from overwriting the winner's files
    outputs/<task_id>/<attempt>-<part>.json  a part of a result too large for the task record
                                         (service/aws/result_spill.py)
    models/<name>/...                    model weights mirrored for the workers (aws/model_mirror.py)
    adapters/<sha256>.<safetensors|zip>  an uploaded LoRA/LoKr adapter, by the sha256 of its bytes (kept until
                                         deleted: no lifecycle rule)

Adapters, the API and the CDK stack (S3 lifecycle rules, IAM prefixes) take prefixes from here.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, urlsplit

UPLOADS_PREFIX = "uploads/"
PENDING_UPLOADS_PREFIX = "uploads/pending/"
OUTPUTS_PREFIX = "outputs/"
MODELS_PREFIX = "models/"
ADAPTERS_PREFIX = "adapters/"
ADAPTER_EXTENSIONS = ("safetensors", "zip")
# audio_format -> the output file's extension (32-bit float WAV is a .wav; Opus comes in Ogg as .opus, AAC in
# ADTS as .aac, the extensions upstream writes)
OUTPUT_EXTENSIONS = {"mp3": "mp3", "wav": "wav", "wav32": "wav", "flac": "flac", "opus": "opus", "aac": "aac"}

_PENDING_RE = re.compile(r"^uploads/pending/[0-9a-f]{32}/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_OUTPUT_RE = re.compile(r"^outputs/([A-Za-z0-9_-]{1,128})/([A-Za-z0-9_-]{1,64})\.(mp3|wav|flac|opus|aac)$")
_RESULT_PART_RE = re.compile(r"^outputs/([A-Za-z0-9_-]{1,128})/([0-9]{1,10}-[a-z_]{1,32})\.json$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class OutputKey:
    task_id: str
    name: str  # "<attempt>-<index>"
    format: str

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.format}"


def safe_filename(name: str) -> str:
    """A client's file name reduced to `[A-Za-z0-9._-]`, no leading dot, at most 100 characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).lstrip("._-")[:100]
    return base or "audio"


def new_pending_upload_key(filename: str, owner: Optional[str] = None) -> str:
    """A direct upload's key; the folder's first 8 hex digits tag the caller it is issued to (a digest
    of its id), by which its unused uploads are counted (service/upload_quota.py)."""
    folder = uuid.uuid4().hex
    if owner:
        folder = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:8] + folder[8:]
    return f"{PENDING_UPLOADS_PREFIX}{folder}/{safe_filename(filename)}"


def pending_upload_tag(key: str) -> str:
    """The caller tag of a direct upload's key (see new_pending_upload_key)."""
    return key[len(PENDING_UPLOADS_PREFIX):][:8]


def is_pending_upload_key(key: str) -> bool:
    return bool(_PENDING_RE.match(key)) and ".." not in key


def task_upload_key(task_id: str, role: str, filename: str) -> str:
    ext = ""
    if "." in filename:
        ext = "." + filename.rsplit(".", 1)[1].lower()[:8]
        if not ext[1:].isalnum():
            ext = ""
    return f"{UPLOADS_PREFIX}{task_id}/{role}{ext}"


def output_key(task_id: str, attempt: int, index: int, fmt: str) -> str:
    """The key of a generated file in audio_format `fmt`."""
    return f"{OUTPUTS_PREFIX}{task_id}/{attempt}-{index}.{OUTPUT_EXTENSIONS[fmt]}"


def parse_output_key(key: str) -> Optional[OutputKey]:
    match = _OUTPUT_RE.match(key)
    return OutputKey(*match.groups()) if match else None


def result_part_key(task_id: str, attempt: int, part: str) -> str:
    return f"{OUTPUTS_PREFIX}{task_id}/{attempt}-{part}.json"


def parse_result_part_key(key: str) -> Optional[OutputKey]:
    """A result part's key (never an audio file: not servable as one, not usable as a source)."""
    match = _RESULT_PART_RE.match(key)
    return OutputKey(match.group(1), match.group(2), "json") if match else None


def output_key_in(reference: str) -> Optional[str]:
    """The output key a client refers to: the key itself, or a `/v1/audio?path=<key>...` URL (as
    /query_result returns it, relative or absolute). None when it is neither (a server path)."""
    text = reference.strip()
    if parse_output_key(text):
        return text
    parts = urlsplit(text)
    if not parts.path.endswith("/v1/audio"):
        return None
    key = next(iter(parse_qs(parts.query).get("path", [])), "")
    return key if parse_output_key(key) else None


def adapter_key(sha256: str, ext: str) -> str:
    """Where an uploaded adapter's bytes are stored: content-addressed, so a re-upload stores nothing new."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256) or ext not in ADAPTER_EXTENSIONS:
        raise ValueError(f"not an adapter's sha256 and extension: {sha256!r}, {ext!r}")
    return f"{ADAPTERS_PREFIX}{sha256}.{ext}"


def is_within_storage(key: str) -> bool:
    """A relative key under one of our prefixes (not a server path or a traversal attempt)."""
    return key.startswith((OUTPUTS_PREFIX, UPLOADS_PREFIX)) and ".." not in key and not key.startswith("/")
