"""/query_result's bodies: the entries (service/task_payload.py, which webhooks carry too) read from the
store in one call, finished ones cached, serialised once into upstream's envelope."""
from __future__ import annotations

import json
import time
from typing import Any, Hashable, Optional

from service.config import Settings
from service.ports import Backend
from service.records import QUEUED, TERMINAL
from service.signed_urls import KeySource, expiry, signature, url_keys
from service.task_payload import entry_for

from .result_cache import FinishedEntries

MAX_IDS = 200
MAX_ID_LEN = 128


def dumps(value: Any) -> bytes:
    """JSON as FastAPI's JSONResponse writes it (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def signature_window(settings: Settings, keys: KeySource) -> Hashable:
    """What a finished entry's signed URLs depend on: the expiry they carry and the signing key
    (a signature of a fixed message tells keys apart without holding the key)."""
    return expiry(settings.audio_url_ttl), signature(keys, "audio-window", "", 0)


WAITING_ENTRIES = 2_000  # entries of queued/running (and unknown) ids kept per API process


class QueryResults:
    """/query_result bodies: finished entries from the cache, the rest read from the store; where the
    store has a change token (TaskStore.change_token), the rest are kept too while it holds, so the
    common "still waiting" poll costs what a finished one does until something changes."""

    def __init__(self, settings: Settings, backend: Backend, cache: Optional[FinishedEntries] = None):
        self.settings, self.backend = settings, backend
        self.keys = url_keys(backend)
        self.cache = cache if cache is not None else FinishedEntries()
        self.waiting = FinishedEntries(WAITING_ENTRIES)  # keyed by (window, change token)

    def cached(self, task_ids: list[str]) -> Optional[list[bytes]]:
        """Every entry from the caches, or None when one must be read (no table read: fine on the event
        loop; the change token is one PRAGMA on the embedded backend)."""
        window = signature_window(self.settings, self.keys)
        token: Optional[Hashable] = None
        out = []
        for task_id in task_ids:
            entry = self.cache.get(task_id, window)
            if entry is None:
                token = token if token is not None else self.backend.store.change_token()
                entry = self.waiting.get(task_id, (window, token)) if token is not None else None
                if entry is None:
                    return None
            out.append(entry)
        return out

    def entries(self, task_ids: list[str]) -> list[bytes]:
        """One serialised entry per requested id, in order; reads the store for those not cached."""
        window = signature_window(self.settings, self.keys)
        token = self.backend.store.change_token()  # before the read: a change during it shows on the next poll
        found = {t: e for t in dict.fromkeys(task_ids) if (e := self.cache.get(t, window)) is not None}
        missing = [t for t in task_ids if t not in found]
        if missing:
            for task_id, entry, kind in self._read(missing):
                found[task_id] = entry
                if kind == _FINISHED:
                    self.cache.put(task_id, window, entry)
                elif kind == _WAITING and token is not None:
                    self.waiting.put(task_id, (window, token), entry)
        return [found[t] for t in task_ids]

    def _read(self, task_ids: list[str]) -> list[tuple[str, bytes, Optional[str]]]:
        """(id, entry, which cache may keep it) per id; one store read for all of them."""
        lookup = sorted({t for t in task_ids if t and len(t) <= MAX_ID_LEN})
        records = self.backend.store.get_many(lookup) if lookup else {}
        queued = [t for t, r in records.items() if r.status == QUEUED]
        positions = self.backend.store.queue_positions(queued) if queued else {}
        out = []
        for task_id in dict.fromkeys(task_ids):
            record = records.get(task_id)
            entry = dumps(entry_for(task_id, record, self.settings, self.keys, positions.get(task_id)))
            # A result the store could not read whole is not cached: a storage hiccup must not hide a part
            # for a window.
            whole = record is None or record.result is None or not record.result.generation_info.get("missing_parts")
            kind = None
            if record is None or record.status not in TERMINAL:
                kind = _WAITING  # changes only with the store (a claim, progress, a submit of that id)
            elif whole:
                kind = _FINISHED
            out.append((task_id, entry, kind))
        return out


_FINISHED, _WAITING = "finished", "waiting"


def envelope_bytes(entries: list[bytes]) -> bytes:
    """The success envelope (envelope.wrap) around already serialised entries."""
    return (b'{"data":[' + b",".join(entries) + b'],"code":200,"error":null,"timestamp":'
            + str(int(time.time() * 1000)).encode() + b',"extra":null}')
