"""Uploaded adapters onto the worker's disk: fetched from the blob store by their sha256 before a task runs.

The engine loads them from `<cache_dir>/<sha256>.<ext>` (engine/adapters.py); a copy already there is used as it is
(content-addressed: the name says what the bytes are, and they were hashed when written).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from engine.request import AdapterRef

from .blob_keys import ADAPTER_EXTENSIONS, adapter_key
from .ports import BlobStore
from .records import FailureReason
from .task_errors import TaskFailure


def cached(cache_dir: Path, sha256: str) -> bool:
    return any((cache_dir / f"{sha256}.{ext}").is_file() for ext in ADAPTER_EXTENSIONS)


def fetch_uploaded(blobs: BlobStore, cache_dir: Path, refs: Iterable[AdapterRef], max_bytes: int) -> None:
    """Brings every uploaded adapter of `refs` that acts (scale not 0) into `cache_dir`; TaskFailure if one is gone,
    too large, or its bytes are not the ones named."""
    for ref in refs:
        if ref.sha256 is None or ref.scale == 0.0 or cached(cache_dir, ref.sha256):
            continue
        for ext in ADAPTER_EXTENSIONS:
            key = adapter_key(ref.sha256, ext)
            size = blobs.size(key)
            if size is None:
                continue
            if size > max_bytes:
                raise TaskFailure(f"adapter {ref.name!r} is {size / 2**20:.1f} MB; the limit is "
                                  f"{max_bytes / 2**20:.0f} MB", FailureReason.INPUT_TOO_LARGE)
            try:
                data = blobs.get(key)
            except KeyError:  # deleted between size() and get()
                continue
            if hashlib.sha256(data).hexdigest() != ref.sha256:
                raise TaskFailure(f"adapter {ref.name!r}: the stored bytes are not the uploaded ones (sha256 differs)",
                                  FailureReason.INPUT_MISSING)
            cache_dir.mkdir(parents=True, exist_ok=True)
            path = cache_dir / f"{ref.sha256}.{ext}"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # whole or absent, also with two workers sharing the folder
            break
        else:
            raise TaskFailure(f"adapter {ref.name!r} (uploaded, sha256 {ref.sha256[:12]}...) is missing from storage "
                              "(deleted since the task was submitted?)", FailureReason.ADAPTER_MISSING)
