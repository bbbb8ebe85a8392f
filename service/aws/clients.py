"""boto3 clients configured from Settings (region, optional endpoint for moto/localstack).

Clients are created on first use, and boto3 (with botocore's config and endpoint machinery) is
imported only then: on Lambda, importing boto3 and building three clients was about 40 % of the
cold start, paid even by requests that never reach AWS (auth errors, /health's first line).
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from ..config import Settings

# boto3's default session is not safe to create clients from several threads at once.
_create_lock = threading.Lock()


class LazyClient:
    """Stands in for `boto3.client(service, ...)`; the real client is built on the first attribute
    read (thread-safe: API requests run in a thread pool)."""

    def __init__(self, service: str, settings: Settings, config: Optional[dict] = None):
        self._service, self._settings, self._config = service, settings, config or {}
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        client = self._client
        if client is None:
            with _create_lock:
                if self._client is None:
                    self._client = _make_client(self._service, self._settings, self._config)
                client = self._client
        return getattr(client, name)


def _make_client(service: str, settings: Settings, config: dict):
    import boto3
    from botocore.config import Config

    # Standard retry mode backs off on throttling, which a burst of submits can hit.
    base = Config(retries={"mode": "standard", "max_attempts": 5}, **config)
    return boto3.client(
        service,
        region_name=settings.aws_region or None,
        endpoint_url=settings.aws_endpoint_url or None,
        config=base,
    )


def aws_client(service: str, settings: Settings, config: Optional[dict] = None) -> Any:
    """A client for `service` (built on first use); ACESTEP_AWS_ENDPOINT_URL redirects every service
    (moto, localstack). `config`: extra botocore Config arguments."""
    return LazyClient(service, settings, config)


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ClientError, or '' for anything else."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
