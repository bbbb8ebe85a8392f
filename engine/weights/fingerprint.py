"""Content fingerprints of component folders, so two model variants share a VAE / text encoder only when their files
are the same bytes (engine/service.py). A wrong answer would silently run one model with another's component.

    component_fingerprint(<model>/vae)  ->  sha256 over (relative name, sha256 of the file) of every file, sorted

Hashing a 2B model's shareable components reads ~3 GiB (7 s from a cold disk), so each file's sha256 is kept in a
sidecar beside the folder, <model>/.<component>.fingerprint.json, with the file's stat at the time it was hashed:
size, mtime_ns, ctime_ns and inode (stat follows symlinks: a hub snapshot's link is judged by its blob). A later
start re-hashes only the files whose stat differs and reads nothing else. A file rewritten in place changes its
ctime even when its mtime is set back (`touch -r`, rsync -t, cp -p), and a file swapped in by a rename has another
inode, so neither is trusted from the sidecar. Accepted limit: a filesystem that does not keep ctime and inodes
(some FUSE mounts) could hide a same-size rewrite whose mtime was restored; the sidecar is trusted as far as the
weights beside it are. A folder the worker cannot write (read-only weights) gets no sidecar: it is hashed each start.

Import is torch-free.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger("engine.weights.fingerprint")

SIDECAR_VERSION = 1
_CHUNK = 1 << 22

# In one process: a file hashed once (several models pointing at one folder, a later load) is not read again.
_HASH_CACHE: dict[tuple, str] = {}


def sidecar_path(path: Path) -> Path:
    """Beside the component folder (not in it: the fingerprint covers every file inside)."""
    return path.parent / f".{path.name}.fingerprint.json"


def _stat_key(file: Path) -> list[int]:
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def hash_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sidecar(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_sidecar(path: Path, files: dict[str, dict]) -> None:
    """Atomically (temp file + rename): two workers starting together each write a whole sidecar, the last wins."""
    target = sidecar_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": SIDECAR_VERSION, "files": files}, f, indent=1)
            os.chmod(tmp, 0o644)  # a worker running as another user reads what root wrote
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.info("cannot keep the fingerprint of %s in %s (%s): it is hashed again at each start", path, target, exc)


def component_fingerprint(path: Path) -> Optional[str]:
    """Content hash of one component folder (configs + weights), or None when the folder is absent.

    Files whose stat matches the sidecar take their hash from it; the others are read and hashed, and the sidecar
    is rewritten when anything changed.
    """
    if not path.is_dir():
        return None
    known = _read_sidecar(path)
    files: dict[str, dict] = {}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = str(file.relative_to(path))
        stat = _stat_key(file)  # before reading: a file changed while it is hashed is re-hashed next time
        entry = known.get(name)
        if not (isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("sha256"), str)):
            key = (str(file.resolve()), *stat)
            if key not in _HASH_CACHE:
                _HASH_CACHE[key] = hash_file(file)
            entry = {"stat": stat, "sha256": _HASH_CACHE[key]}
        files[name] = entry
        digest.update(name.encode())
        digest.update(entry["sha256"].encode())
    if files != known:
        _write_sidecar(path, files)
    return digest.hexdigest()
