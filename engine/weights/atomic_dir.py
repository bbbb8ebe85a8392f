"""Write a folder all at once: build it in a temp folder beside its destination, then rename it into place.

    with exclusive_lock(dst), build_then_swap(dst) as tmp:
        ... write files into tmp ...

The built folder is made readable by everyone (folders 0755, files 0644, `share_readable`) whatever the umask:
weights converted or downloaded as root must be readable by a worker running as another user (the image's
uid 1000). A crash mid-build leaves only a hidden `.<name>.tmp-*` folder, never a half-written `dst`; the next build of the
same `dst` removes such leftovers. The lock (an flock on `.<name>.lock` beside `dst`) keeps two processes from
building the same folder at once, which also makes removing leftovers safe.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger("engine.weights.atomic_dir")


def _hidden(dst: Path, suffix: str) -> Path:
    return dst.parent / f".{dst.name}.{suffix}"


@contextlib.contextmanager
def exclusive_lock(dst: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on building `dst` (blocks while another process holds it)."""
    dst = Path(dst)
    mkdirs_readable(dst.parent)
    with open(_hidden(dst, "lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(dst: Path) -> None:
    """Delete temp folders of earlier builds of `dst` that never finished (call with the lock held)."""
    for leftover in dst.parent.glob(f".{dst.name}.tmp-*"):
        log.warning("removing %s, left by an interrupted build of %s", leftover, dst)
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def build_then_swap(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `dst`; on a normal exit it replaces `dst`, on an exception it is deleted.

    Call with `exclusive_lock(dst)` held.
    """
    dst = Path(dst)
    remove_leftovers(dst)
    tmp = _hidden(dst, f"tmp-new-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_readable(tmp)
    old = _hidden(dst, f"tmp-old-{uuid.uuid4().hex[:8]}")
    if dst.exists():
        dst.rename(old)  # two renames: a crash between them leaves no dst, and leftovers the next build removes
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def share_readable(root: str | os.PathLike) -> None:
    """Let every user read `root` and everything under it (adds r/x bits: folders rwxr-xr-x, files rw-r--r--).

    Only the owner's write stays: weights are shared read-only. A mkdtemp folder (0700) or a umask of 077
    would otherwise leave them to the user who wrote them."""
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        wanted = mode | (0o755 if path.is_dir() else 0o644)
        if wanted != mode:
            path.chmod(wanted)


def mkdirs_readable(folder: Path) -> None:
    """mkdir -p, with every folder it creates readable by all (0755) whatever the umask."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        path.chmod(path.stat().st_mode | 0o755)
