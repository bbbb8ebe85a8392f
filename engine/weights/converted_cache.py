"""A diffusers-layout copy of each original-layout model, converted once and reused while its sources are unchanged.

    <checkpoint_dir>/<name>/, vae/, Qwen3-Embedding-0.6B/          the original layout (engine/weights/original_layout.py)
    <checkpoint_dir>/.diffusers/<name>/                            its conversion: model_index.json + components
    <checkpoint_dir>/.diffusers/<name>/acestep_converted_from.json what it was converted from

acestep_converted_from.json records the conversion format version and the size and mtime of every file the
conversion reads (the DiT's config.json, weights, silence_latent.pt and demo marker; all of vae/ and the text
encoder); it is written inside the temp folder before the atomic rename, so a cache folder that has it is
complete. The cache is rebuilt when that record differs from the sources now (a file added, removed, replaced or
touched).

Import is torch-free; converting imports torch lazily.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from engine.weights import original_layout as layout
from engine.weights.atomic_dir import build_then_swap, exclusive_lock
from engine.weights.demo_marker import DEMO_MARKER

log = logging.getLogger("engine.weights.converted_cache")

CACHE_DIR = ".diffusers"
SOURCE_RECORD = "acestep_converted_from.json"
# Bump when the conversion writes something different for the same sources: every cache is then rebuilt.
CONVERSION_VERSION = 1


def cache_path(checkpoint_dir: str | Path, name: str) -> Path:
    return Path(checkpoint_dir) / CACHE_DIR / name


def source_record(checkpoint_dir: str | Path, name: str) -> dict:
    """{"conversion_version": N, "files": {relative path: [size, mtime_ns]}} of every file the conversion reads."""
    root = Path(checkpoint_dir)
    files = {}
    for file in layout.source_files(root, name, dit_extras=(DEMO_MARKER,)):  # the marker is copied along
        stat = file.stat()  # follows symlinks (hub snapshots link into a blob store)
        files[str(file.relative_to(root))] = [stat.st_size, stat.st_mtime_ns]
    return {"conversion_version": CONVERSION_VERSION, "files": files}


def is_fresh(cache: Path, record: dict) -> bool:
    try:
        return json.loads((cache / SOURCE_RECORD).read_text()) == record
    except (OSError, json.JSONDecodeError):
        return False


def ensure_converted(checkpoint_dir: str | Path, name: str) -> Path:
    """Path of the diffusers-layout conversion of original-layout model `name`, converting it first if the cache is
    missing or stale. Safe with several processes: one converts, the others wait for it and reuse its result."""
    cache = cache_path(checkpoint_dir, name)
    record = source_record(checkpoint_dir, name)
    if is_fresh(cache, record):
        return cache
    with exclusive_lock(cache):
        if is_fresh(cache, record):  # another process converted it while this one waited for the lock
            return cache
        from engine.weights.convert import write_diffusers_layout

        log.warning("converting %s from the original ACE-Step layout under %s into %s (once; reused until its "
                    "files change)", name, checkpoint_dir, cache)
        t0 = time.perf_counter()
        with build_then_swap(cache) as tmp:
            write_diffusers_layout(checkpoint_dir, name, tmp)
            (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        log.info("converted %s in %.1fs", name, time.perf_counter() - t0)
    return cache
