"""A full disk is an outage, not a bug: adapters raise StorageFull, the API answers 507 and the worker
backs off instead of failing (or dead-lettering) tasks that are fine."""
from __future__ import annotations

import errno
import shutil
import sqlite3

from .refusals import STORAGE_FULL_MESSAGE, StorageFull


def is_storage_full(exc: BaseException) -> bool:
    if isinstance(exc, StorageFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


def has_room(path: str, min_free_bytes: int) -> bool:
    """At least `min_free_bytes` free where `path` lives."""
    try:
        return shutil.disk_usage(path).free >= min_free_bytes
    except OSError:
        return True  # cannot tell: let the write itself decide


__all__ = ["STORAGE_FULL_MESSAGE", "StorageFull", "has_room", "is_storage_full"]  # StorageFull re-exported: the adapters raise it from here
