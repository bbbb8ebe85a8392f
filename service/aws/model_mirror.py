"""Model weights mirrored in the stack's S3 bucket, so a GPU worker never pulls GBs from the public hub.

`publish` copies a local checkpoint folder (the diffusers layout the engine loads) to
`s3://<bucket>/models/<name>/`, with a manifest listing every file and its size, written last: a
half-finished publish has no manifest and is never fetched. `fetch` brings a published model onto
the worker's local disk before the engine loads it: many files at once and large files in
parallel ranged parts (boto3's transfer manager), skipping files already present with the right
size, so an instance whose disk survived a restart starts at once.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from boto3.s3.transfer import TransferConfig

from ..blob_keys import MODELS_PREFIX
from ..json_types import JSONObject
from .clients import AwsClient, error_code

log = logging.getLogger(__name__)

MANIFEST = "acestep-manifest.json"
# Large files in 64 MB parts, 16 at a time: a GPU instance's network, not one TCP stream, is the limit.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=16)
FILES_AT_ONCE = 8


def model_prefix(name: str) -> str:
    return f"{MODELS_PREFIX}{name}/"


def _published(path: Path) -> bool:
    """Not a half-written download, nor the engine's per-host hash cache (engine/weights/fingerprint.py:
    `.<component>.fingerprint.json`, keyed on this host's inodes and ctimes, so useless on another)."""
    name = path.name
    # ".fingerprint.json" inside the name: also a sidecar's temp file left by a start killed while writing it
    return not name.startswith(".part-") and not (name.startswith(".") and ".fingerprint.json" in name)


def publish(s3: AwsClient, bucket: str, name: str, source: Path) -> int:
    """Upload every file under `source`; returns the bytes uploaded. The manifest goes last."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and _published(p))
    if not files:
        raise FileNotFoundError(f"nothing to publish under {source}")
    prefix = model_prefix(name)

    def upload(path: Path) -> int:
        s3.upload_file(str(path), bucket, prefix + path.relative_to(source).as_posix(), Config=TRANSFER)
        return path.stat().st_size

    with ThreadPoolExecutor(FILES_AT_ONCE) as pool:
        total = sum(pool.map(upload, files))
    manifest = {"name": name, "published_at": time.time(),
                "files": {p.relative_to(source).as_posix(): p.stat().st_size for p in files}}
    s3.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=json.dumps(manifest, indent=1).encode(),
                  ContentType="application/json")
    log.info("published model %s to s3://%s/%s (%.1f MB)", name, bucket, prefix, total / 1e6)
    return total


def read_manifest(s3: AwsClient, bucket: str, name: str) -> Optional[JSONObject]:
    try:
        body = s3.get_object(Bucket=bucket, Key=model_prefix(name) + MANIFEST)["Body"].read()
    except Exception as exc:
        if error_code(exc) in ("NoSuchKey", "404", "403", "AccessDenied"):
            return None
        raise
    manifest = json.loads(body)
    if not isinstance(manifest, dict):
        raise ValueError(f"s3://{bucket}/{model_prefix(name)}{MANIFEST} holds no JSON object")
    return manifest


def fetch(s3: AwsClient, bucket: str, name: str, dest: Path) -> Optional[int]:
    """Download a published model into `dest`; returns the bytes fetched, or None if not published.

    Each file lands under a temporary name and is renamed when complete, so an interrupted fetch
    leaves no file that looks whole.
    """
    manifest = read_manifest(s3, bucket, name)
    if manifest is None:
        return None
    prefix = model_prefix(name)
    todo = {rel: size for rel, size in manifest["files"].items()
            if not ((dest / rel).is_file() and (dest / rel).stat().st_size == size)}
    started = time.monotonic()

    def download(item: tuple[str, int]) -> int:
        rel, size = item
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".part-{target.name}")
        s3.download_file(bucket, prefix + rel, str(partial), Config=TRANSFER)
        got = partial.stat().st_size
        if got != size:
            partial.unlink()
            raise OSError(f"s3://{bucket}/{prefix}{rel}: got {got} bytes, expected {size}")
        os.replace(partial, target)
        return size

    with ThreadPoolExecutor(FILES_AT_ONCE) as pool:
        fetched = sum(pool.map(download, todo.items()))
    seconds = time.monotonic() - started
    log.info("fetched model %s from s3://%s/%s: %d of %d files, %.1f MB in %.1f s (%.0f MB/s)", name, bucket,
             prefix, len(todo), len(manifest["files"]), fetched / 1e6, seconds, fetched / 1e6 / max(seconds, 1e-6))
    return fetched
