"""Finished `/query_result` entries, serialised once per signature window.

A finished task (succeeded, failed, cancelled) never changes again, so its entry is the same on every poll until
the signed audio URLs in it roll over to the next expiry window (signing.expiry). Caching the
serialised JSON per (task, window) turns a poll of finished tasks into dictionary look-ups and a
byte join: no store read, no re-signing, no JSON encoding. Queued and running tasks are never
cached; they are read from the store on every poll.

A cached entry outlives its task by at most one window when the retention sweep deletes it (the
audio URLs in it stop working at once either way).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Optional

# Finished entries kept per API process (~2.5 KB each for a 2-file result).
MAX_ENTRIES = 10_000


class FinishedEntries:
    """LRU of task id -> (window, serialised entry); thread-safe (polls run in a thread pool)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[Hashable, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task_id: str, window: Hashable) -> Optional[bytes]:
        with self._lock:
            hit = self._entries.get(task_id)
            if hit is None or hit[0] != window:
                return None
            self._entries.move_to_end(task_id)
            return hit[1]

    def put(self, task_id: str, window: Hashable, entry: bytes) -> None:
        with self._lock:
            self._entries[task_id] = (window, entry)
            self._entries.move_to_end(task_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
