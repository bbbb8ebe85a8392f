"""Typed views of the API's answers, read leniently: this server's shapes and upstream's alike.

Upstream's /query_result `result` is a JSON string; its `metas` mix numbers and "N/A"; a failed task
may carry no reason and an unknown id stays "in progress" forever. Everything the server sent is
kept in `raw` for fields this package does not name.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # this server's; upstream has no cancel

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


def _number(value: Any) -> Optional[float]:
    """A metas value: a number, a numeric string, or "N/A"/None (unknown)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _text(value: Any) -> Optional[str]:
    if value is None or value == "N/A" or value == "":
        return None
    return str(value)


@dataclass(frozen=True)
class Metas:
    bpm: Optional[float] = None
    duration: Optional[float] = None
    keyscale: Optional[str] = None
    timesignature: Optional[str] = None
    genres: Optional[str] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any) -> "Metas":
        data = data if isinstance(data, dict) else {}
        return cls(bpm=_number(data.get("bpm")), duration=_number(data.get("duration")),
                   keyscale=_text(data.get("keyscale")), timesignature=_text(data.get("timesignature")),
                   genres=_text(data.get("genres")), raw=data)


@dataclass(frozen=True)
class AudioResult:
    """One generated file of a succeeded task."""
    index: int
    file: str  # as the server gave it: upstream's is relative (`/v1/audio?path=...`)
    seed: Optional[int]
    format: Optional[str]
    metas: Metas
    prompt: str = ""
    lyrics: str = ""
    generation_info: str = ""
    dit_model: str = ""
    lm_model: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def extension(self) -> str:
        """The file's extension: the reported format's (wav32, 32-bit float, is a .wav), else the file key's,
        else mp3 (upstream's default)."""
        if self.format:
            return "wav" if self.format == "wav32" else self.format
        path = urlsplit(self.file)
        name = (parse_qs(path.query).get("path") or [path.path])[0]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
        return ext if ext in ("mp3", "wav", "flac", "ogg", "opus", "aac", "m4a") else "mp3"


@dataclass(frozen=True)
class TaskStatus:
    """One /query_result entry."""
    task_id: str
    state: TaskState
    queue_position: Optional[int] = None
    progress: float = 0.0  # 0..1
    stage: str = ""
    error: Optional[str] = None
    progress_text: str = ""
    audios: tuple[AudioResult, ...] = ()
    raw: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state.finished

    @classmethod
    def parse(cls, entry: dict) -> "TaskStatus":
        task_id = str(entry.get("task_id", ""))
        items = _result_items(entry.get("result"))
        first = items[0] if items else {}
        status = entry.get("status")
        progress_text = str(entry.get("progress_text") or "")
        if status == 1:
            return cls(task_id, TaskState.SUCCEEDED, progress=1.0, stage="succeeded", progress_text=progress_text,
                       audios=tuple(_audios(items)), raw=entry)
        if status == 2:
            error = entry.get("error") or first.get("error") or "the task failed (the server gave no reason)"
            state = TaskState.CANCELLED if first.get("stage") == "cancelled" else TaskState.FAILED
            return cls(task_id, state, progress=_number(first.get("progress")) or 0.0, stage=state.value,
                       error=str(error), progress_text=progress_text, raw=entry)
        stage = str(first.get("stage") or "")
        position = first.get("queue_position")
        state = TaskState.QUEUED if stage in ("queued", "") else TaskState.RUNNING  # "[]": upstream's unknown id
        return cls(task_id, state, queue_position=position if isinstance(position, int) else None,
                   progress=_number(first.get("progress")) or 0.0, stage=stage or "queued",
                   progress_text=progress_text, raw=entry)


def _result_items(result: Any) -> list[dict]:
    if isinstance(result, str):
        try:
            result = json.loads(result) if result.strip() else []
        except ValueError:
            return []
    if isinstance(result, dict):
        result = [result]
    return [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []


def _seeds(text: Any) -> list[Optional[int]]:
    out: list[Optional[int]] = []
    for part in str(text or "").split(","):
        try:
            out.append(int(part.strip()))
        except ValueError:
            out.append(None)
    return out


def _audios(items: list[dict]) -> list[AudioResult]:
    audios = []
    for i, item in enumerate(items):
        file = item.get("file") or item.get("url") or ""
        if not file:  # upstream: analysis results and all-silent outputs carry no file
            continue
        seed = item.get("seed")
        if not isinstance(seed, int):  # upstream reports only the shared "s1,s2" string
            shared = _seeds(item.get("seed_value"))
            seed = shared[i] if i < len(shared) else None
        audios.append(AudioResult(
            index=i, file=str(file), seed=seed, format=item.get("format") or None,
            metas=Metas.parse(item.get("metas")), prompt=str(item.get("prompt") or ""),
            lyrics=str(item.get("lyrics") or ""), generation_info=str(item.get("generation_info") or ""),
            dit_model=str(item.get("dit_model") or ""), lm_model=str(item.get("lm_model") or ""), raw=item))
    return audios


@dataclass(frozen=True)
class Submitted:
    task_id: str
    queue_position: Optional[int] = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    is_default: bool = False
    random_weights: Optional[bool] = None


@dataclass(frozen=True)
class ModelList:
    models: tuple[ModelInfo, ...]
    default_model: Optional[str] = None
    lm_model: Optional[str] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Any) -> "ModelList":
        """The documented wrapped shape `{data: {models: [{name, is_default}], default_model}}`, or the
        OpenRouter list `{object: "list", data: [{id, name}]}` that upstream's route serves in its place."""
        body = body if isinstance(body, dict) else {}
        data = body.get("data")
        if isinstance(data, list):  # OpenRouter shape
            models = tuple(ModelInfo(name=str(m.get("id") or m.get("name")), is_default=i == 0)
                           for i, m in enumerate(data) if isinstance(m, dict))
            return cls(models, models[0].name if models else None, raw=body)
        data = data if isinstance(data, dict) else {}
        models = tuple(ModelInfo(name=str(m.get("name")), is_default=bool(m.get("is_default")),
                                 random_weights=m.get("random_weights"))
                       for m in data.get("models") or [] if isinstance(m, dict))
        return cls(models, data.get("default_model"), data.get("lm_model"), raw=body)


@dataclass(frozen=True)
class AdapterInfo:
    """One LoRA/LoKr adapter of GET /v1/adapters (or the one an upload stored)."""
    name: str
    kind: str = ""  # lora | lokr (the listing's `type`)
    format: str = ""  # peft_dir | peft_file | lycoris_file
    rank: Optional[int] = None
    alpha: Optional[float] = None
    size_bytes: Optional[int] = None
    source: str = ""  # uploaded | lora_dir | worker_lora_dir
    where: str = ""
    sha256: Optional[str] = None
    model: Optional[str] = None  # the model it was checked against at upload
    fits_models: tuple[str, ...] = ()
    created: Optional[bool] = None  # upload only: False when the same file already had this name
    raw: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, created: Optional[bool] = None) -> "AdapterInfo":
        data = data if isinstance(data, dict) else {}
        rank, alpha, size = data.get("rank"), _number(data.get("alpha")), data.get("size_bytes")
        return cls(name=str(data.get("name") or ""), kind=str(data.get("type") or data.get("kind") or ""),
                   format=str(data.get("format") or ""), rank=rank if isinstance(rank, int) else None,
                   alpha=alpha, size_bytes=size if isinstance(size, int) else None,
                   source=str(data.get("source") or ""), where=str(data.get("where") or ""),
                   sha256=data.get("sha256") or None, model=data.get("model") or None,
                   fits_models=tuple(str(m) for m in data.get("fits_models") or []), created=created, raw=data)


@dataclass(frozen=True)
class AdapterList:
    adapters: tuple[AdapterInfo, ...]
    unusable: dict = field(default_factory=dict)  # files under the server's ACESTEP_LORA_DIR that are not adapters: why
    default: dict = field(default_factory=dict)  # /v1/lora/status: what a request without `adapter` gets
    max_bytes: Optional[int] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any) -> "AdapterList":
        data = data if isinstance(data, dict) else {}
        unusable, default, limit = data.get("unusable"), data.get("default"), data.get("max_bytes")
        return cls(tuple(AdapterInfo.parse(a) for a in data.get("adapters") or [] if isinstance(a, dict)),
                   unusable if isinstance(unusable, dict) else {}, default if isinstance(default, dict) else {},
                   limit if isinstance(limit, int) else None, raw=data)

    def fitting(self, model: str) -> tuple[AdapterInfo, ...]:
        """The adapters a request for `model` may name."""
        return tuple(a for a in self.adapters if model in a.fits_models)
