"""BlobStore on the local filesystem: opaque keys map to files under one root."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator, Optional

from ..ports import BlobStore
from ..storage_errors import StorageFull, is_storage_full


class InvalidKey(KeyError):
    pass


class FileBlobStore(BlobStore):
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        # Keys are relative, slash-separated, with no empty/dot segments; the realpath check
        # below is the second fence against escaping the root.
        parts = key.split("/")
        if not key or key.startswith("/") or "\\" in key or "\x00" in key \
                or any(p in ("", ".", "..") for p in parts):
            raise InvalidKey(key)
        path = os.path.realpath(os.path.join(self.root, *parts))
        if not path.startswith(self.root + os.sep):
            raise InvalidKey(key)
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._replacing(key) as tmp:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:  # as mkstemp
                f.write(data)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    def size(self, key: str) -> Optional[int]:
        try:
            return os.path.getsize(self._path(key))
        except (FileNotFoundError, InvalidKey):
            return None

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, InvalidKey):
            pass

    def copy(self, src: str, dst: str) -> None:
        """A hard link where the file system allows one (no bytes copied), else a copy; atomic either way."""
        source = self._path(src)
        if not os.path.isfile(source):
            raise KeyError(src)
        with self._replacing(dst) as tmp:
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, tmp)

    @contextlib.contextmanager
    def _replacing(self, key: str) -> Iterator[str]:
        """A temporary path beside `key`'s file that becomes that file when the block ends: a reader never
        sees a half-written file. On failure the temporary file goes; a full disk is StorageFull."""
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".part-{uuid.uuid4().hex}")
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if is_storage_full(exc):
                raise StorageFull(f"no room for {key}: {exc}") from exc
            raise

    def remove_empty_folder(self, prefix: str) -> None:
        """Remove the folder of `prefix` ("uploads/<task_id>/") when nothing is left in it."""
        try:
            os.rmdir(self._path(prefix.rstrip("/")))
        except (OSError, InvalidKey):
            pass  # not empty, gone already, or not a folder of ours

    def delete_older_than(self, prefix: str, cutoff: float, keep: frozenset[str] = frozenset()) -> int:
        """Delete files under `prefix` last written before `cutoff` (epoch seconds), except `keep` keys."""
        root = self._path(prefix.rstrip("/"))
        kept = {self._path(k) for k in keep if k.startswith(prefix)}
        removed = 0
        for folder, _, files in os.walk(root, topdown=False):
            for name in files:
                path = os.path.join(folder, name)
                if path not in kept and os.path.getmtime(path) < cutoff:
                    os.unlink(path)
                    removed += 1
            if folder != root and not os.listdir(folder):
                os.rmdir(folder)
        return removed

    def keys_older_than(self, prefix: str, cutoff: float) -> list[str]:
        """Keys under `prefix` whose files were last written before `cutoff` (epoch seconds)."""
        root = self._path(prefix.rstrip("/"))
        out = []
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if not name.endswith(".tmp") and os.path.getmtime(path) < cutoff:
                    out.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        return out

    def local_path(self, key: str) -> Optional[str]:
        path = self._path(key)
        return path if os.path.isfile(path) else None

    def presigned_get_url(self, key: str, expires_seconds: int) -> Optional[str]:
        return None

    def presigned_put_url(self, key: str, content_type: str, expires_seconds: int) -> Optional[str]:
        return None
