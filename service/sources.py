"""A task's source and reference audio: from what the client declared to what submit_task stores.

Parsing only says where each role's audio comes from (a file sent with the request, a direct
upload key, or a path on this server); reading files and asking the blob store happen here, at
submit time. Errors are SourceError; the API maps `invalid` to 400 and `too_large` to 413.
"""
from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Protocol, Sequence, Union

from . import blob_keys
from .refusals import SourceRejected
from .submission import Upload

MB = 1024 * 1024


@dataclass(frozen=True)
class SentFile:
    """A file sent with the request (multipart)."""
    role: str
    upload: Upload
    label: str  # the client's name for it, for error messages


@dataclass(frozen=True)
class UploadKey:
    """A direct upload (POST /v1/uploads, then PUT) that the task takes over."""
    role: str
    key: str
    label: str


@dataclass(frozen=True)
class ServerPath:
    """A file on this server, readable only inside ACESTEP_ALLOWED_AUDIO_DIRS."""
    role: str
    path: str
    label: str


AudioSource = Union[SentFile, UploadKey, ServerPath]


class Sizes(Protocol):
    """All resolve_sources asks of the blob store (ports.BlobStore has it)."""

    def size(self, key: str) -> Optional[int]: ...


class SourceError(SourceRejected):
    def __init__(self, kind: Literal["invalid", "too_large"], message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = 413 if kind == "too_large" else 400


@dataclass
class ResolvedSources:
    uploads: dict[str, Upload] = field(default_factory=dict)  # role -> file for submit_task to store
    keys: dict[str, str] = field(default_factory=dict)  # role -> pending upload key, as `<role>_key`


def resolve_sources(sources: Sequence[AudioSource], blobs: Sizes, *, allowed_dirs: Sequence[str],
                    max_bytes: int,
                    outputs: Optional[Callable[[ServerPath, str], Upload]] = None) -> ResolvedSources:
    """`outputs` reads a finished task's file named as a path (service/task_outputs.py)."""
    out = ResolvedSources()
    for source in sources:
        if isinstance(source, SentFile):
            out.uploads[source.role] = source.upload
        elif isinstance(source, UploadKey):
            out.keys[source.role] = check_upload_key(source, blobs, max_bytes)
        elif outputs is not None and (key := blob_keys.output_key_in(source.path)):
            out.uploads[source.role] = outputs(source, key)
        else:
            out.uploads[source.role] = read_server_file(source, allowed_dirs, max_bytes)
    return out


def _too_large(what: str, max_bytes: int) -> SourceError:
    return SourceError("too_large", f"{what} too large: the limit is {max_bytes // MB} MB")


def check_upload_key(source: UploadKey, blobs: Sizes, max_bytes: int) -> str:
    label, key = source.label, source.key
    if not blob_keys.is_pending_upload_key(key):
        raise SourceError("invalid", f"{label}: not an upload key; create one with POST /v1/uploads "
                                     f"(keys look like '{blob_keys.PENDING_UPLOADS_PREFIX}<id>/<name>')")
    size = blobs.size(key)
    if size is None:
        raise SourceError("invalid", f"{label}: nothing was uploaded under this key "
                                     "(PUT the file to its upload_url first)")
    if size > max_bytes:  # a presigned PUT cannot cap the size itself
        raise _too_large(f"Upload {label!r}", max_bytes)
    return key


def _within(path: str, roots: Sequence[str]) -> bool:
    for root in roots:
        if not root:
            continue
        real_root = os.path.realpath(root)
        if path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep):
            return True
    return False


def read_server_file(source: ServerPath, allowed_dirs: Sequence[str], max_bytes: int) -> Upload:
    label, role = source.label, source.role
    if "\x00" in source.path or len(source.path) > 4096:
        raise SourceError("invalid", f"{label}: not a valid file path")
    real = os.path.realpath(source.path)  # symlinks resolved first: a link out of the allowed dirs is refused
    if not _within(real, allowed_dirs):
        raise SourceError("invalid", f"{label}: server file paths are not accepted here; upload the file instead "
                                     f"(multipart field '{role}', or POST /v1/uploads and send '{role}_key')")
    if not os.path.isfile(real):
        raise SourceError("invalid", f"{label}: file not found")
    if os.path.getsize(real) > max_bytes:
        raise _too_large(f"{label} file", max_bytes)
    with open(real, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since the size check
        raise _too_large(f"{label} file", max_bytes)
    name = os.path.basename(real)
    return Upload(data=data, filename=name, content_type=mimetypes.guess_type(name)[0] or "application/octet-stream")


__all__ = ["AudioSource", "ResolvedSources", "SentFile", "ServerPath", "SourceError", "UploadKey",
           "resolve_sources"]
