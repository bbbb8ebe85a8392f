"""Build /query_result entries from task records (upstream §2.2, without its bugs).

Each entry is `{task_id, status 0|1|2, result: <JSON string>, progress_text}`. `result` parses to
one item per audio file when succeeded, or one status item otherwise (queued: queue_position;
running: progress and stage; failed: the error message). Unknown ids are failed with
"task not found" rather than upstream's forever-in-progress.
"""
from __future__ import annotations

import json
import time
from typing import Any, Hashable, Optional

from engine.request import GenerationRequest
from service.config import Settings
from service.ports import Backend
from service.records import CANCELLED, FAILED, QUEUED, SUCCEEDED, TERMINAL, AudioFile, TaskRecord, TaskResult

from .result_cache import FinishedEntries
from service.signed_urls import audio_url, expiry, signature

ENV = "development"  # upstream's constant; clients print it
NOT_FOUND = "task not found"
META_KEYS = ("bpm", "duration", "genres", "keyscale", "timesignature")
MAX_IDS = 200
MAX_ID_LEN = 128


def generation_info_text(info: dict[str, Any], dit_model: str, lm_model: str) -> str:
    """A readable one-paragraph summary; says "random weights" loudly for demo models."""
    parts = []
    if info.get("random_weights"):
        parts.append("WARNING: random weights (demo model) - the audio is noise, not music")
    if info.get("test_engine"):
        parts.append("test engine")
    parts.append(f"DiT: {dit_model or 'unknown'}")
    parts.append(f"LM: {lm_model or 'none'}")
    for key, value in info.items():
        if key in ("random_weights", "test_engine", "notes") or isinstance(value, (dict, list)) or value is None:
            continue
        if isinstance(value, float):
            value = round(value, 3)
        parts.append(f"{key}: {value}")
    timings = info.get("timings")
    if isinstance(timings, dict) and timings:
        parts.append("time: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    notes = info.get("notes")
    if isinstance(notes, list) and notes:
        parts.append("notes: " + "; ".join(str(n) for n in notes))
    return ", ".join(parts)


def _base_item(record: TaskRecord, status: int) -> dict[str, Any]:
    req = record.request
    return {
        "file": "", "wave": "", "status": status, "create_time": int(record.created_at), "env": ENV,
        "prompt": req.prompt, "lyrics": req.lyrics, "metas": {},
    }


def _metas(result: TaskResult, req: GenerationRequest, audio: Optional[AudioFile]) -> dict[str, Any]:
    metas = {k: result.metas.get(k, "N/A") for k in META_KEYS}
    if metas["duration"] in (None, "N/A") and audio and audio.duration is not None:
        metas["duration"] = audio.duration
    for k in META_KEYS:
        if metas[k] is None:
            metas[k] = "N/A"
    metas["prompt"] = req.prompt
    metas["lyrics"] = req.lyrics
    return metas


def succeeded_items(record: TaskRecord, settings: Settings, base_url: str = "") -> list[dict[str, Any]]:
    """One item per audio file; `base_url` prefixes the file URLs (relative without it, as upstream)."""
    result = record.result or TaskResult()
    req = record.request
    info = dict(result.generation_info)
    dit_model = result.dit_model or req.model or ""
    lm_model = result.lm_model
    info["random_weights"] = result.random_weights
    shared = {
        "generation_info": generation_info_text(info, dit_model, lm_model),
        "generation_info_detail": info,
        "seed_value": ",".join(str(a.seed) for a in result.audios if a.seed is not None),
        "lm_model": lm_model, "dit_model": dit_model, "progress": 1.0, "stage": "succeeded",
        "error": None,
    }
    items = []
    audios: list[Optional[AudioFile]] = list(result.audios) or [None]  # one item even without audio
    for audio in audios:
        item = _base_item(record, 1)
        item["metas"] = _metas(result, req, audio)
        item.update(shared)
        if info.get("analysis_only"):  # the answer is what the LM read or wrote, as upstream reports it
            item["prompt"] = item["metas"]["prompt"] = info.get("caption", item["prompt"])
            item["lyrics"] = item["metas"]["lyrics"] = info.get("lyrics", item["lyrics"])
            item["language"] = info.get("language") or info.get("lm_metadata", {}).get("language", "unknown")
        if audio is not None:
            item["file"] = base_url + audio_url(settings, audio.key)
            item["seed"] = audio.seed
            item["format"] = audio.format
            item["sample_rate"] = audio.sample_rate
            item["channels"] = audio.channels
            item["audio_duration"] = audio.duration
        items.append(item)
    return items


def _entry(task_id: str, status: int, items: list[dict[str, Any]], progress_text: str, error: Optional[str] = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"task_id": task_id, "status": status,
                             "result": json.dumps(items, ensure_ascii=False), "progress_text": progress_text}
    if error is not None:
        entry["error"] = error
    return entry


def entry_for(task_id: str, record: Optional[TaskRecord], settings: Settings, position: Optional[int],
              base_url: str = "") -> dict[str, Any]:
    if record is None:
        item = {"file": "", "wave": "", "status": 2, "create_time": 0, "env": ENV, "prompt": "", "lyrics": "",
                "metas": {}, "progress": 0.0, "stage": "failed", "error": NOT_FOUND}
        return _entry(task_id, 2, [item], NOT_FOUND, NOT_FOUND)
    if record.status == SUCCEEDED:
        items = succeeded_items(record, settings, base_url)
        return _entry(task_id, 1, items, f"succeeded: {len(items)} audio file(s)")
    if record.status in (FAILED, CANCELLED):  # upstream has no "cancelled": a failed task that says so
        item = _base_item(record, 2)
        error = record.error or ("cancelled" if record.status == CANCELLED else "generation failed")
        item.update({"progress": float(record.progress or 0.0), "stage": record.status, "error": error})
        return _entry(task_id, 2, [item], f"{record.status}: {error}", error)
    item = _base_item(record, 0)
    if record.status == QUEUED:
        item.update({"progress": 0.0, "stage": "queued", "queue_position": position, "error": None})
        text = f"queued (position {position})" if position else "queued"
        return _entry(task_id, 0, [item], text)
    item.update({"progress": float(record.progress or 0.0), "stage": record.stage or "running", "error": None})
    return _entry(task_id, 0, [item], f"{record.stage or 'running'} ({round(100 * (record.progress or 0))}%)")


def dumps(value: Any) -> bytes:
    """JSON as FastAPI's JSONResponse writes it (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def signature_window(settings: Settings) -> Hashable:
    """What a finished entry's signed URLs depend on: the expiry they carry and the signing key
    (a signature of a fixed message tells keys apart without holding the key)."""
    return expiry(settings.audio_url_ttl), signature(settings, "audio-window", "", 0)


class QueryResults:
    """/query_result bodies: finished entries from the cache, the rest read from the store."""

    def __init__(self, settings: Settings, backend: Backend, cache: Optional[FinishedEntries] = None):
        self.settings, self.backend = settings, backend
        self.cache = cache if cache is not None else FinishedEntries()

    def cached(self, task_ids: list[str]) -> Optional[list[bytes]]:
        """Every entry from the cache, or None when one must be read (no I/O: fine on the event loop)."""
        window = signature_window(self.settings)
        out = []
        for task_id in task_ids:
            entry = self.cache.get(task_id, window)
            if entry is None:
                return None
            out.append(entry)
        return out

    def entries(self, task_ids: list[str]) -> list[bytes]:
        """One serialised entry per requested id, in order; reads the store for those not cached."""
        window = signature_window(self.settings)
        found = {t: e for t in dict.fromkeys(task_ids) if (e := self.cache.get(t, window)) is not None}
        missing = [t for t in task_ids if t not in found]
        if missing:
            for task_id, entry, finished in self._read(missing):
                found[task_id] = entry
                if finished:
                    self.cache.put(task_id, window, entry)
        return [found[t] for t in task_ids]

    def _read(self, task_ids: list[str]) -> list[tuple[str, bytes, bool]]:
        """(id, entry, cacheable) per id; one store read for all of them."""
        lookup = sorted({t for t in task_ids if t and len(t) <= MAX_ID_LEN})
        records = self.backend.store.get_many(lookup) if lookup else {}
        queued = [t for t, r in records.items() if r.status == QUEUED]
        positions = self.backend.store.queue_positions(queued) if queued else {}
        out = []
        for task_id in dict.fromkeys(task_ids):
            record = records.get(task_id)
            entry = dumps(entry_for(task_id, record, self.settings, positions.get(task_id)))
            # A result the store could not read whole is not cached: a storage hiccup must not hide a part
            # for a window.
            whole = record is None or record.result is None or not record.result.generation_info.get("missing_parts")
            out.append((task_id, entry, record is not None and record.status in TERMINAL and whole))
        return out


def envelope_bytes(entries: list[bytes]) -> bytes:
    """The success envelope (envelope.wrap) around already serialised entries."""
    return (b'{"data":[' + b",".join(entries) + b'],"code":200,"error":null,"timestamp":'
            + str(int(time.time() * 1000)).encode() + b',"extra":null}')
