"""boto3 clients configured from Settings (region, optional endpoint for moto/localstack)."""
from __future__ import annotations

from typing import Optional

import boto3
from botocore.config import Config

from ..config import Settings


def aws_client(service: str, settings: Settings, config: Optional[Config] = None):
    """A client for `service`; ACESTEP_AWS_ENDPOINT_URL redirects every service (moto, localstack)."""
    # Standard retry mode backs off on throttling, which a burst of submits can hit.
    base = Config(retries={"mode": "standard", "max_attempts": 5})
    if config is not None:
        base = base.merge(config)
    return boto3.client(
        service,
        region_name=settings.aws_region or None,
        endpoint_url=settings.aws_endpoint_url or None,
        config=base,
    )


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ClientError, or '' for anything else."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
