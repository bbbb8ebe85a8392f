"""boto3 clients configured from Settings (region, optional endpoint for moto/localstack).

Clients are created on first use, and boto3 (with botocore's config and endpoint machinery) is
imported only then: on Lambda, importing boto3 and building three clients was about 40 % of the
cold start, paid even by requests that never reach AWS (auth errors, /health's first line).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Optional, TypeAlias

from ..config import Settings

# boto3 builds its clients at run time from service models and ships no types: a client (or a
# LazyClient standing in for one) is dynamic, and what it returns is AWS's JSON.
AwsClient: TypeAlias = Any

# boto3's default session is not safe to create clients from several threads at once.
_create_lock = threading.Lock()
# Every LazyClient made, so a SnapStart restore can drop what the snapshot's environment built.
_made: "weakref.WeakSet[LazyClient]" = weakref.WeakSet()


class LazyClient:
    """Stands in for `boto3.client(service, ...)`; the real client is built on the first attribute
    read (thread-safe: API requests run in a thread pool)."""

    def __init__(self, service: str, settings: Settings, config: Optional[dict[str, Any]] = None):
        self._service, self._settings, self._config = service, settings, config or {}
        self._client: Any = None
        _made.add(self)

    def build(self) -> None:
        """Create the real client now rather than on first use."""
        self.__getattr__("meta")

    def forget(self) -> None:
        """Drop the real client (its connection pool and credentials); the next use builds another."""
        with _create_lock:
            self._client = None

    def __getattr__(self, name: str) -> Any:
        client = self._client
        if client is None:
            with _create_lock:
                if self._client is None:
                    self._client = _make_client(self._service, self._settings, self._config)
                client = self._client
        return getattr(client, name)


def _make_client(service: str, settings: Settings, config: dict[str, Any]) -> AwsClient:
    from botocore.config import Config

    # Standard retry mode backs off on throttling, which a burst of submits can hit.
    base = Config(retries={"mode": "standard", "max_attempts": 5}, **config)
    return _session().client(
        service,
        region_name=settings.aws_region or None,
        endpoint_url=settings.aws_endpoint_url or None,
        config=base,
    )


# One boto3 session for every client here (caller holds _create_lock), over a botocore session we
# keep a hand on, so its loaded service models can outlive it.
_boto3_session: Any = None
_botocore_session: Any = None


def _session() -> Any:
    if _boto3_session is None:
        _open_session()
    return _boto3_session


def _open_session(loader: Any = None) -> None:
    """A new session (credentials resolved afresh); `loader`: an earlier session's, whose parsed
    service models it keeps."""
    global _boto3_session, _botocore_session
    import boto3
    import botocore.session

    _botocore_session = botocore.session.get_session()
    if loader is not None:
        _botocore_session.register_component("data_loader", loader)
    _boto3_session = boto3.session.Session(botocore_session=_botocore_session)


def build_all() -> None:
    """Build every client made so far (loads botocore's service models into the session's cache)."""
    for client in list(_made):
        client.build()


def forget_sessions() -> None:
    """Drop every built client and the session's credentials, so both are resolved again, while
    keeping the service models already parsed: for a restored SnapStart copy."""
    for client in list(_made):
        client.forget()
    with _create_lock:
        if _boto3_session is None:  # nothing was built, nothing to forget
            return
        _open_session(loader=_botocore_session.get_component("data_loader"))


def aws_client(service: str, settings: Settings, config: Optional[dict[str, Any]] = None) -> Any:
    """A client for `service` (built on first use); ACESTEP_AWS_ENDPOINT_URL redirects every service
    (moto, localstack). `config`: extra botocore Config arguments."""
    return LazyClient(service, settings, config)


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ClientError, or '' for anything else."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
