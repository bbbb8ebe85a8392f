"""DELETE /v1/adapters/{name}: an uploaded adapter leaves the index, and its bytes leave the blob store once no
other name refers to the same sha256.

Refused (409, saying why) while something still needs it: the fleet's default (/v1/lora/*) names it, or a
queued or running task does (queued: the store's queued list; running: the ids the workers' heartbeats carry).
An adapter under ACESTEP_LORA_DIR is the operator's files: refused too, never removed through the API.
A task claimed between those reads and the delete fails with FailureReason.ADAPTER_MISSING naming it.
"""
from __future__ import annotations

import logging
from typing import Optional

from .adapter_catalog import AdapterCatalog, AdapterEntry, UploadedIndex
from .adapter_defaults import DefaultAdapterState
from .adapter_uploads import release_blob
from .ports import BlobStore, TaskStore
from .records import TERMINAL
from .refusals import AdapterConflict, AdapterUnknown

log = logging.getLogger(__name__)
SHOWN_TASKS = 5  # task ids named in the 409


class AdapterRemoval:
    def __init__(self, catalog: AdapterCatalog, defaults: DefaultAdapterState, store: TaskStore, blobs: BlobStore,
                 max_queued: int):
        self.catalog, self.defaults, self.store, self.blobs = catalog, defaults, store, blobs
        self.max_queued = max_queued

    def tasks_using(self, name: str) -> list[str]:
        """Queued and running tasks whose request names adapter `name`."""
        running = [t for b in self.store.heartbeats() for t in b.task_ids]  # stalled workers' tasks too
        ids = list(dict.fromkeys([*self.store.queued_task_ids(self.max_queued), *running]))
        out = []
        for task_id, record in self.store.get_many(ids).items():
            if record.status in TERMINAL:
                continue
            try:
                names = {a.name for a in record.request.adapters}
            except Exception:  # noqa: BLE001 - a request this version cannot read names no adapter of ours
                continue
            if name in names:
                out.append(task_id)
        return sorted(out)

    def remove(self, name: str) -> AdapterEntry:
        entry = self.catalog.uploaded(fresh=True).adapters.get(name)
        if entry is None:
            if self.catalog.find(name) is not None:
                raise AdapterConflict(f"adapter {name!r} is under ACESTEP_LORA_DIR (the operator's files), not "
                                      "uploaded: remove it there")
            raise AdapterUnknown(f"no uploaded adapter named {name!r} (GET /v1/adapters lists them)")
        if self.defaults.uses(name):
            raise AdapterConflict(f"adapter {name!r} is the fleet's default (GET /v1/lora/status): "
                                  "POST /v1/lora/unload (or load another) first")
        users = self.tasks_using(name)
        if users:
            shown = ", ".join(users[:SHOWN_TASKS]) + (" ..." if len(users) > SHOWN_TASKS else "")
            raise AdapterConflict(f"adapter {name!r} is used by {len(users)} queued or running task(s) ({shown}): "
                                  "delete it when they have finished")

        def drop(index: UploadedIndex) -> tuple[Optional[UploadedIndex], Optional[AdapterEntry]]:
            gone = index.adapters.get(name)
            if gone is None:
                return None, None
            return index.model_copy(update={"adapters": {k: v for k, v in index.adapters.items() if k != name}}), gone

        removed = self.catalog.change_uploaded(drop)
        if removed is None:  # another request deleted it first
            raise AdapterUnknown(f"no uploaded adapter named {name!r} (GET /v1/adapters lists them)")
        if release_blob(self.catalog, self.blobs, removed):
            log.info("adapter %s deleted with its bytes %s", name, removed.where)
        return removed


__all__ = ["AdapterRemoval"]
