"""The LoRA/LoKr adapters a request may name, where each is kept, and whether it fits a model.

One namespace of names, three places an adapter can be:
- uploaded (POST /v1/adapters): its bytes in the blob store under blob_keys.adapter_key(sha256, ext); the index
  of them (name -> entry) is the task store's meta UPLOADED_META_KEY, so every API process and both backends
  read one list.
- under ACESTEP_LORA_DIR on this machine (embedded: the API and its workers share the disk), read with
  engine.adapter_manifest (headers and adapter_config.json only; cached by each file's size and mtime).
- under the workers' ACESTEP_LORA_DIR as they published it (meta WORKER_LOCAL_META_KEY): how an API that
  cannot see the workers' disk (Lambda) knows them.

"Fits" means the adapter's modules and tensor shapes match the model's attention geometry (ModelShape): the
one a worker reported for that model (records.ModelEntry.adapter_shape), else the published one of an ACE-Step
1.5 model of that name. A model whose geometry is unknown is trusted to the worker's own load.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from engine.adapter_manifest import AdapterInfo, AdapterInvalid, ModelShape, inspect_adapter, published_shape
from engine.request import ADAPTER_NAME_RE

from .adapter_meta import update_meta
from .config import Settings
from .fleet import served_model_names
from .ports import Backend
from .records import MODELS_META_KEY, ModelsMeta

log = logging.getLogger(__name__)
T = TypeVar("T")

UPLOADED_META_KEY = "adapters_uploaded"
WORKER_LOCAL_META_KEY = "adapters_local"
FRESH_SECONDS = 1.0  # how long an index read answers "yes, it exists" before it is read again

Source = Literal["uploaded", "lora_dir", "worker_lora_dir"]


class AdapterEntry(BaseModel):
    """One adapter as GET /v1/adapters lists it and the submit check reads it."""

    name: str
    kind: str  # lora | lokr
    format: str  # peft_dir | peft_file | lycoris_file
    rank: int
    alpha: float
    size_bytes: int
    target_modules: list[str] = []
    num_layers: int = 0
    shape: Optional[dict[str, int]] = None  # the geometry it was checked against (ModelShape.as_dict())
    model: Optional[str] = None  # the model named at upload (uploaded ones)
    source: Source
    where: str  # the blob key (uploaded) or the path on the machine that holds it
    sha256: Optional[str] = None  # uploaded ones: what the worker fetches
    ext: Optional[str] = None
    uploaded_at: Optional[float] = None

    @classmethod
    def from_info(cls, info: AdapterInfo, *, source: Source, where: str, **extra: Any) -> "AdapterEntry":
        shape = info.shape.as_dict() if info.shape is not None else None
        return cls(name=info.name, kind=info.kind, format=info.format, rank=info.rank, alpha=info.alpha,
                   size_bytes=info.size_bytes, target_modules=list(info.target_modules), num_layers=info.num_layers,
                   shape=shape, source=source, where=where, **extra)


class UploadedIndex(BaseModel):
    adapters: dict[str, AdapterEntry] = {}


class WorkerLocal(BaseModel):
    """What a worker found under its ACESTEP_LORA_DIR (published at its start)."""
    worker_id: Optional[str] = None
    updated_at: Optional[float] = None
    adapters: list[dict[str, Any]] = []


def shape_of(data: Optional[dict[str, Any]]) -> Optional[ModelShape]:
    if not data:
        return None
    try:
        return ModelShape(**{k: int(data[k]) for k in ModelShape.__dataclass_fields__})
    except (KeyError, TypeError, ValueError):
        return None


def mismatch(entry: AdapterEntry, model: str, shape: Optional[ModelShape]) -> Optional[str]:
    """Why `entry` does not fit `model` (of geometry `shape`), or None."""
    made_for = shape_of(entry.shape)
    if shape is None or made_for is None:
        return None  # one side unknown: the worker's load decides
    if made_for != shape:
        theirs = ", ".join(f"{k} {v}" for k, v in made_for.as_dict().items())
        ours = ", ".join(f"{k} {v}" for k, v in shape.as_dict().items())
        return f"adapter {entry.name!r} does not fit model {model!r}: it was made for ({theirs}), the model has ({ours})"
    if entry.num_layers > shape.num_hidden_layers:
        return (f"adapter {entry.name!r} does not fit model {model!r}: it touches layer {entry.num_layers - 1}, "
                f"the model has {shape.num_hidden_layers}")
    return None


@dataclass
class _Cached:
    fingerprint: tuple[Any, ...]
    entry: Optional[AdapterEntry]
    error: Optional[str]


class AdapterCatalog:
    def __init__(self, settings: Settings, backend: Backend, *, scan_lora_dir: bool = True,
                 fresh_seconds: float = FRESH_SECONDS):
        self.settings, self.backend, self.store = settings, backend, backend.store
        # Where the API shares the workers' disk (one machine). On Lambda the folder is absent: nothing found.
        self.scan_lora_dir = scan_lora_dir
        self.fresh_seconds = fresh_seconds
        self._lock = threading.Lock()
        self._index: Optional[UploadedIndex] = None
        self._index_until = 0.0
        self._inspected: dict[str, _Cached] = {}

    # -- where things are -----------------------------------------------------------------------------

    @property
    def lora_dir(self) -> Path:
        configured = getattr(self.settings, "lora_dir", "") or ""
        return Path(configured) if configured else Path(self.settings.checkpoint_dir) / "loras"

    def served_models(self) -> list[str]:
        """The DiT models served now, the first the default (after a POST /v1/init switch: the new set)."""
        return served_model_names(self.settings, self.backend)

    def model_shape(self, model: str) -> Optional[ModelShape]:
        """The attention geometry adapters for `model` must have: as a worker reported it, else published."""
        try:
            meta = ModelsMeta.parse(self.store.get_meta(MODELS_META_KEY))
        except Exception:  # the store briefly unreachable: the published geometry still answers
            log.warning("could not read the models meta", exc_info=True)
            meta = None
        entry = meta.find(model) if meta else None
        reported = shape_of(getattr(entry, "adapter_shape", None)) if entry else None
        return reported or published_shape(model)

    # -- the uploaded index ---------------------------------------------------------------------------

    def uploaded(self, *, fresh: bool = False) -> UploadedIndex:
        now = time.monotonic()
        with self._lock:
            if not fresh and self._index is not None and now < self._index_until:
                return self._index
        try:
            index = UploadedIndex.model_validate(self.store.get_meta(UPLOADED_META_KEY) or {})
        except ValidationError:
            log.error("the uploaded adapters' index does not parse: treated as empty", exc_info=True)
            index = UploadedIndex()
        with self._lock:
            self._index, self._index_until = index, now + self.fresh_seconds
        return index

    def change_uploaded(self, change: Callable[[UploadedIndex], tuple[Optional[UploadedIndex], T]]) -> T:
        """Applies `change` (index -> (new index or None: no write, answer)) to the stored index, written only
        over the version it read (adapter_meta.update_meta): two uploads or deletes at once both land."""
        written: list[UploadedIndex] = []

        def step(current: Optional[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], T]:
            written.clear()
            try:
                index = UploadedIndex.model_validate(current or {})
            except ValidationError:
                log.error("the uploaded adapters' index does not parse: rewritten from empty", exc_info=True)
                index = UploadedIndex()
            new, answer = change(index)
            if new is None:
                return None, answer
            written.append(new)
            return new.model_dump(mode="json"), answer

        answer = update_meta(self.store, UPLOADED_META_KEY, step)
        if written:
            with self._lock:
                self._index, self._index_until = written[0], time.monotonic() + self.fresh_seconds
        return answer

    # -- adapters on disk -----------------------------------------------------------------------------

    def _candidates(self) -> list[Path]:
        root = self.lora_dir
        try:
            children = sorted(root.iterdir())
        except OSError:
            return []
        out = []
        for path in children:
            name = path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") else path.name
            if path.name.startswith(".") or not _valid_name(name):
                continue
            if path.is_dir() or path.name.endswith(".safetensors"):
                out.append(path)
        return out

    def _served_shapes(self) -> list[tuple[str, ModelShape]]:
        return [(m, shape) for m in self.served_models() if (shape := self.model_shape(m)) is not None]

    def _inspect(self, path: Path) -> tuple[Optional[AdapterEntry], Optional[str]]:
        """The adapter at `path`, checked against the served models' geometries: its `shape` is the first one
        it fits; one that fits none is unusable (the reason is the default model's). Cached while its files
        and those geometries are unchanged."""
        shapes = self._served_shapes()
        fingerprint = (_fingerprint(path), tuple(shapes))
        key = str(path)
        with self._lock:
            cached = self._inspected.get(key)
        if cached is not None and cached.fingerprint == fingerprint:
            return cached.entry, cached.error
        name = path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        entry, error = None, None
        try:
            info = inspect_adapter(path, name=name, max_bytes=self.settings.max_adapter_bytes)
            reasons = []
            for model, shape in shapes:
                try:
                    info = inspect_adapter(path, name=name, shape=shape, max_bytes=self.settings.max_adapter_bytes)
                    break
                except AdapterInvalid as exc:
                    reasons.append(f"it does not fit model {model!r}: {exc}")
            else:
                if shapes:
                    raise AdapterInvalid(reasons[0])
            entry = AdapterEntry.from_info(info, source="lora_dir", where=str(path))
        except AdapterInvalid as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot be read: {exc.strerror or exc}"
        with self._lock:
            self._inspected[key] = _Cached(fingerprint, entry, error)
        return entry, error

    def on_disk(self) -> tuple[list[AdapterEntry], dict[str, str]]:
        """Adapters under this machine's ACESTEP_LORA_DIR, and the ones that do not load (name -> why)."""
        if not self.scan_lora_dir:
            return [], {}
        good, bad = [], {}
        for path in self._candidates():
            entry, error = self._inspect(path)
            if entry is not None:
                good.append(entry)
            else:
                bad[path.name] = error or "not an adapter"
        return good, bad

    def on_workers(self) -> list[AdapterEntry]:
        """What the workers published of their ACESTEP_LORA_DIR (what an API without their disk knows)."""
        try:
            local = WorkerLocal.model_validate(self.store.get_meta(WORKER_LOCAL_META_KEY) or {})
        except ValidationError:
            return []
        out = []
        for item in local.adapters:
            try:
                out.append(AdapterEntry.model_validate({**item, "source": "worker_lora_dir",
                                                        "where": str(item.get("where") or item.get("path") or "")}))
            except ValidationError:
                continue
        return out

    # -- lookups --------------------------------------------------------------------------------------

    def listing(self) -> tuple[list[AdapterEntry], dict[str, str]]:
        """Every adapter by name (uploaded ones win a clash: an upload may not take a local name, but a
        worker may gain one later), and the files under ACESTEP_LORA_DIR that are not adapters."""
        disk, broken = self.on_disk()
        seen: dict[str, AdapterEntry] = {}
        for entry in [*self.uploaded().adapters.values(), *disk, *self.on_workers()]:
            seen.setdefault(entry.name, entry)
        return sorted(seen.values(), key=lambda e: e.name), broken

    def find(self, name: str) -> Optional[AdapterEntry]:
        entry = self.uploaded().adapters.get(name)
        if entry is not None:
            return entry
        if self.scan_lora_dir:
            for path in (self.lora_dir / name, self.lora_dir / f"{name}.safetensors"):
                if _valid_name(name) and path.exists():
                    found, _ = self._inspect(path)
                    if found is not None:
                        return found
        entry = next((e for e in self.on_workers() if e.name == name), None)
        if entry is not None:
            return entry
        return self.uploaded(fresh=True).adapters.get(name)  # uploaded a moment ago through another process

    def problem(self, name: str) -> str:
        """Why `name` is not an adapter this server can apply (for a 400)."""
        if self.scan_lora_dir and _valid_name(name):
            for path in (self.lora_dir / name, self.lora_dir / f"{name}.safetensors"):
                if path.exists():
                    _, error = self._inspect(path)
                    return f"adapter {name!r} under ACESTEP_LORA_DIR is not usable: {error}"
        return f"no adapter named {name!r} (GET /v1/adapters lists them; POST /v1/adapters uploads one)"

    def models_fitting(self, entry: AdapterEntry) -> list[str]:
        """The served models this adapter fits (all of them when its geometry is unknown)."""
        return [m for m in self.served_models() if mismatch(entry, m, self.model_shape(m)) is None]


def _valid_name(name: str) -> bool:
    return bool(re.fullmatch(ADAPTER_NAME_RE, name))


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """Size and mtime of the files an adapter at `path` is read from (a folder: its files, and final/'s)."""
    def stat(p: Path) -> tuple[Any, ...]:
        try:
            st = p.stat()
        except OSError:
            return (p.name, None)
        return (p.name, st.st_size, st.st_mtime_ns)

    if not path.is_dir():
        return (stat(path),)
    parts: list[tuple[Any, ...]] = []
    for folder in (path, path / "final"):
        try:
            parts.extend(stat(folder / n) for n in sorted(os.listdir(folder)))
        except OSError:
            continue
    return tuple(parts)


__all__ = ["AdapterCatalog", "AdapterEntry", "UPLOADED_META_KEY", "UploadedIndex", "WORKER_LOCAL_META_KEY",
           "mismatch", "shape_of"]
