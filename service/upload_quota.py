"""Direct uploads (POST /v1/uploads, then a PUT) count against their caller's quota until a task uses them.

An upload's key carries a tag of the caller it was issued to (blob_keys.new_pending_upload_key), so
the PUT, which holds only a signed URL, knows whose quota it fills. On the embedded backend the API
takes the PUT and checks it here; on AWS the PUT goes to S3 directly (no disk to fill). Unused
uploads expire PENDING_UPLOAD_SECONDS after they were written (the embedded sweep).
"""
from __future__ import annotations

import math

from .blob_keys import PENDING_UPLOADS_PREFIX, pending_upload_tag
from .config import Settings
from .ports import BlobStore

PENDING_UPLOAD_SECONDS = 3600  # an upload's URL lives 15 minutes; a client submits right after the PUT
QUOTA_UPLOADS = 4  # a caller's unused uploads may hold this many audio uploads of the largest size, and one adapter


def quota_bytes(settings: Settings) -> int:
    """What one caller's unused direct uploads (audio and adapters, POST /v1/adapters/uploads) may hold."""
    return QUOTA_UPLOADS * settings.max_upload_bytes + settings.max_adapter_bytes


def pending_bytes(blobs: BlobStore, key: str) -> int:
    """What the unused direct uploads of `key`'s caller hold, `key` itself aside (a PUT replaces it);
    0 for a store that cannot list its files (S3 takes the PUT itself)."""
    listing = getattr(blobs, "keys_older_than", None)
    if listing is None:
        return 0
    tag = pending_upload_tag(key)
    return sum(blobs.size(k) or 0 for k in listing(PENDING_UPLOADS_PREFIX, math.inf)
               if k != key and pending_upload_tag(k) == tag)
