"""Taking in an uploaded adapter: checked whole before anything is kept, then stored by its sha256.

The check is engine.adapter_manifest's (torch-free: safetensors headers, adapter_config.json, a zip's
listing): every key names a module the model has, every tensor's shape fits the model's geometry, ranks
agree. A file that fails it is a 400 here, so no worker ever loads it. Bytes go to the blob store under
blob_keys.adapter_key (the same bytes uploaded twice are stored once); the name goes into the catalog's index.
"""
from __future__ import annotations

import hashlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.adapter_manifest import AdapterInvalid, inspect_adapter
from engine.request import ADAPTER_NAME_RE

from . import blob_keys
from .adapter_catalog import AdapterCatalog, AdapterEntry, UploadedIndex
from .config import Settings
from .ports import BlobStore
from .refusals import AdapterConflict, AdapterRejected, AdapterTooLarge

ZIP_MAGIC = b"PK\x03\x04"


def release_blob(catalog: AdapterCatalog, blobs: BlobStore, gone: AdapterEntry) -> bool:
    """Deletes the stored bytes of an adapter no longer in the index, unless another name refers to the same
    sha256 (the same file uploaded under two names is stored once). True when deleted."""
    if not gone.sha256 or not gone.ext:
        return False
    if any(e.sha256 == gone.sha256 for e in catalog.uploaded(fresh=True).adapters.values()):
        return False
    blobs.delete(blob_keys.adapter_key(gone.sha256, gone.ext))
    return True


@dataclass(frozen=True)
class AdapterUpload:
    data: bytes
    filename: str = ""  # the client's file name: the adapter's name and kind when not given
    name: Optional[str] = None
    model: Optional[str] = None  # the model it is for (default: the server's default model)
    replace: bool = False  # take over the name from another uploaded adapter


def kind_of(data: bytes, filename: str) -> str:
    """"zip" (a PEFT folder zipped) or "safetensors" (a single file), by content first."""
    if data.startswith(ZIP_MAGIC):
        return "zip"
    if filename.lower().endswith(".zip"):
        raise AdapterRejected("the file is named .zip but is not a zip archive")
    return "safetensors"


def name_from(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".zip"):
        base = base.removesuffix(suffix)
    return base


class AdapterUploads:
    def __init__(self, settings: Settings, blobs: BlobStore, catalog: AdapterCatalog):
        self.settings, self.blobs, self.catalog = settings, blobs, catalog

    def register(self, upload: AdapterUpload) -> tuple[AdapterEntry, bool]:
        """The stored adapter, and whether this call stored it (False: the same bytes were already there
        under that name). Raises AdapterRejected (400), AdapterConflict (409), AdapterTooLarge (413)."""
        limit = self.settings.max_adapter_bytes
        if len(upload.data) > limit:
            raise AdapterTooLarge(f"the adapter is {len(upload.data)} bytes; the limit is "
                                  f"{self.settings.max_adapter_mb} MB (ACESTEP_MAX_ADAPTER_MB)")
        if not upload.data:
            raise AdapterRejected("the adapter file is empty")
        name = (upload.name or name_from(upload.filename)).strip()
        if not re.fullmatch(ADAPTER_NAME_RE, name):
            raise AdapterRejected(f"name: {name!r} is not an adapter name (letters, digits, '.', '_', '-'; "
                                  "at most 128, starting with a letter or digit)")
        served = self.catalog.served_models()
        model = upload.model or next(iter(served), None)
        if not model or model not in served:
            raise AdapterRejected(f"model: {upload.model!r} is not served here (models: {', '.join(served)})")
        shape = self.catalog.model_shape(model)
        if shape is None:
            raise AdapterRejected(f"model {model!r}: its geometry is not known yet (no worker has reported it), "
                                  "so an adapter for it cannot be checked; start a worker and upload again")
        ext = kind_of(upload.data, upload.filename)
        sha = hashlib.sha256(upload.data).hexdigest()
        existing = self.catalog.find(name)
        if existing is not None and existing.source != "uploaded":
            raise AdapterConflict(f"name {name!r} is taken by an adapter under ACESTEP_LORA_DIR; choose another name")
        if existing is not None and existing.sha256 == sha and existing.model == model:
            return existing, False
        if existing is not None and not upload.replace:
            raise AdapterConflict(f"an uploaded adapter is already named {name!r}; send replace=true to replace it")
        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            path = Path(tmp) / f"{name}.{ext}"
            path.write_bytes(upload.data)
            try:
                info = inspect_adapter(path, name=name, shape=shape, max_bytes=limit)
            except AdapterInvalid as exc:
                raise AdapterRejected(f"not a valid adapter for model {model!r}: {exc}") from None
        key = blob_keys.adapter_key(sha, ext)
        if self.blobs.size(key) != len(upload.data):
            self.blobs.put(key, upload.data, "application/octet-stream")
        entry = AdapterEntry.from_info(info, source="uploaded", where=key, sha256=sha, ext=ext, model=model,
                                       uploaded_at=time.time())

        def add(index: UploadedIndex) -> tuple[Optional[UploadedIndex], tuple[AdapterEntry, bool]]:
            # checked again on the index this write replaces: another upload may have taken the name meanwhile
            now = index.adapters.get(name)
            if now is not None and now.sha256 == sha and now.model == model:
                return None, (now, False)
            if now is not None and not upload.replace:
                raise AdapterConflict(f"an uploaded adapter is already named {name!r}; send replace=true to replace it")
            return index.model_copy(update={"adapters": {**index.adapters, name: entry}}), (entry, True)

        # a replaced adapter's bytes stay: tasks queued with its sha256 still fetch them
        return self.catalog.change_uploaded(add)


__all__ = ["AdapterUpload", "AdapterUploads", "kind_of", "name_from", "release_blob"]
