"""Pick the storage/queue adapters named by the settings."""
from __future__ import annotations

from .config import Settings
from .ports import Backend


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "aws":
        from .aws import make_aws_backend  # boto3 only when asked for

        return make_aws_backend(settings)
    from .embedded import make_embedded_backend

    return make_embedded_backend(settings)
