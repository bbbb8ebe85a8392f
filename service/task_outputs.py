"""A finished task's audio as the source of a new task (cover / repaint / lego of a result).

The client sends the result's `file` value (or its output key) as src_audio_path /
reference_audio_path instead of downloading and uploading it again. Whoever may submit tasks may
read every result (/v1/audio with the key), so the check is that the task succeeded and owns
the file. The bytes are copied into the new task's uploads: each task then expires on its own.
"""
from __future__ import annotations

from typing import Callable

from engine.types import CONTENT_TYPES

from . import blob_keys
from .ports import BlobStore, TaskStore
from .records import SUCCEEDED
from .sources import ServerPath, SourceError
from .submission import Upload

OutputReader = Callable[[ServerPath, str], Upload]


def output_reader(store: TaskStore, blobs: BlobStore, max_bytes: int) -> OutputReader:
    def read(source: ServerPath, key: str) -> Upload:
        parsed = blob_keys.parse_output_key(key)
        assert parsed is not None  # output_key_in only returns output keys
        record = store.get(parsed.task_id)
        if record is None or record.status != SUCCEEDED or key not in record.blob_keys:
            raise SourceError("invalid", f"{source.label}: no finished task has the file {key!r} "
                                         "(it may have expired)")
        size = blobs.size(key)
        if size is not None and size > max_bytes:
            raise SourceError("too_large", f"{source.label}: the file is larger than the upload limit "
                                           f"({max_bytes // 2**20} MB)")
        try:
            data = blobs.get(key)
        except KeyError:
            raise SourceError("invalid", f"{source.label}: the file {key!r} is gone (expired)") from None
        name = f"{parsed.task_id}_{parsed.filename}"
        return Upload(data=data, filename=name, content_type=CONTENT_TYPES[parsed.format])
    return read


__all__ = ["OutputReader", "output_reader"]
