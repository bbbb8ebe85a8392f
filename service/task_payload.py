"""A task as upstream's /query_result entry (upstream §2.2, without its bugs): what a poll returns and what
a webhook carries, so it is built here, below HTTP (the worker sends webhooks too).

Each entry is `{task_id, status 0|1|2, result: <JSON string>, progress_text}`. `result` parses to
one item per audio file when succeeded, or one status item otherwise (queued: queue_position;
running: progress and stage; failed: the error message). Unknown ids are failed with
"task not found" rather than upstream's forever-in-progress.

Upstream's spellings of the metas (`keyscale`, `timesignature`, "N/A" when unknown) live here only.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Union

from engine.request import GenerationRequest
from engine.types import GenerationInfo, Metas

from .config import Settings
from .ports import Backend
from .records import CANCELLED, FAILED, QUEUED, SUCCEEDED, AudioFile, TaskRecord, TaskResult
from .signed_urls import KeySource, audio_url, url_keys
from .signing_keys import ephemeral_keys
from .webhooks import WebhookNotifier

ENV = "development"  # upstream's constant; clients print it
NOT_FOUND = "task not found"
UNKNOWN = "N/A"  # upstream's word for a meta nobody determined

# A result item: JSON values as upstream's clients read them.
Item = dict[str, Any]
MetaValue = Union[int, float, str]


def generation_info_text(info: GenerationInfo, dit_model: str, lm_model: str) -> str:
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


def upstream_metas(metas: Metas, duration: Optional[float] = None) -> dict[str, MetaValue]:
    """The metas as upstream names them, "N/A" where unknown; `duration`: the file's, when the engine said none."""
    shown: dict[str, Optional[MetaValue]] = {
        "bpm": metas.bpm, "duration": metas.duration if metas.duration is not None else duration,
        "genres": metas.genres, "keyscale": metas.key_scale, "timesignature": metas.time_signature,
    }
    return {k: UNKNOWN if v is None else v for k, v in shown.items()}


def _base_item(record: TaskRecord, status: int) -> Item:
    req = record.request
    return {
        "file": "", "wave": "", "status": status, "create_time": int(record.created_at), "env": ENV,
        "prompt": req.prompt, "lyrics": req.lyrics, "metas": {},
    }


def _metas(result: TaskResult, req: GenerationRequest, audio: Optional[AudioFile]) -> dict[str, Any]:
    metas: dict[str, Any] = dict(upstream_metas(result.metas, audio.duration if audio else None))
    metas["prompt"] = req.prompt  # upstream: the metas keep the user's own text, the item the song's
    metas["lyrics"] = req.lyrics
    return metas


def _request_text(req: GenerationRequest) -> dict[str, str]:
    """The request's own text, beside what the LM made of it (a dict: the summary text leaves it out)."""
    text = {"prompt": req.prompt, "lyrics": req.lyrics}
    if req.sample_query:
        text["sample_query"] = req.sample_query
    return text


def succeeded_items(record: TaskRecord, settings: Settings, keys: KeySource, base_url: str = "") -> list[Item]:
    """One item per audio file; `base_url` prefixes the file URLs (relative without it, as upstream)."""
    result = record.result or TaskResult()
    req = record.request
    info = result.generation_info.copy()
    dit_model = result.dit_model or req.model or ""
    lm_model = result.lm_model
    info["random_weights"] = result.random_weights
    shared = {
        "generation_info": generation_info_text(info, dit_model, lm_model),
        "generation_info_detail": {**info, "request": _request_text(req)},
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
        # The song's caption and lyrics as upstream shows them: what sample/format mode wrote (not phase 1's
        # caption, which stays in generation_info_detail.caption), else the request's.
        item["prompt"] = info.get("lm_caption", req.prompt)
        item["lyrics"] = info.get("lm_lyrics", req.lyrics)
        if info.get("analysis_only"):  # the answer is what the LM read or wrote, as upstream reports it
            item["prompt"] = item["metas"]["prompt"] = info.get("caption", item["prompt"])
            item["lyrics"] = item["metas"]["lyrics"] = info.get("lyrics", item["lyrics"])
            item["language"] = info.get("language") or info.get("lm_metadata", {}).get("language", "unknown")
        if audio is not None:
            item["file"] = base_url + audio_url(keys, audio.key, settings.audio_url_ttl)
            item["seed"] = audio.seed
            item["format"] = audio.format
            item["sample_rate"] = audio.sample_rate
            item["channels"] = audio.channels
            item["audio_duration"] = audio.duration
        items.append(item)
    return items


def _entry(task_id: str, status: int, items: list[Item], progress_text: str, error: Optional[str] = None) -> Item:
    entry: Item = {"task_id": task_id, "status": status,
                   "result": json.dumps(items, ensure_ascii=False), "progress_text": progress_text}
    if error is not None:
        entry["error"] = error
    return entry


def entry_for(task_id: str, record: Optional[TaskRecord], settings: Settings, keys: KeySource,
              position: Optional[int], base_url: str = "") -> Item:
    if record is None:
        item = {"file": "", "wave": "", "status": 2, "create_time": 0, "env": ENV, "prompt": "", "lyrics": "",
                "metas": {}, "progress": 0.0, "stage": "failed", "error": NOT_FOUND}
        return _entry(task_id, 2, [item], NOT_FOUND, NOT_FOUND)
    if record.status == SUCCEEDED:
        items = succeeded_items(record, settings, keys, base_url)
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


def build_notifier(settings: Settings, backend: Backend) -> WebhookNotifier:
    """The webhook sender: each carries the task's /query_result entry (as a poll would return it at that
    moment), with its file URLs absolute under ACESTEP_PUBLIC_BASE_URL when that is set (a receiver has no
    page to resolve a relative URL against)."""
    keys = url_keys(backend)

    def payload(record: TaskRecord) -> Item:
        return entry_for(record.task_id, record, settings, keys, None, base_url=settings.public_base_url)

    # Signed with the backend's webhook secret, never the API key. A backend that stores none (AWS
    # without ACESTEP_WEBHOOK_SECRET_ARN, which warns when it is built) gets one for this process,
    # which GET /v1/webhook_secret then shows.
    if backend.webhook_keys is None:
        backend.webhook_keys = ephemeral_keys()
    return WebhookNotifier(backend.store, payload, keys=backend.webhook_keys,
                           allow_private=settings.webhook_allow_private, attempts=settings.webhook_attempts,
                           timeout=settings.webhook_timeout, concurrency=settings.webhook_concurrency)
