"""One webhook POST to a vetted address, over within a total time limit.

A socket timeout bounds each read, not the whole exchange: a receiver that sends a byte every few
seconds would hold the attempt for as long as it likes. Here a timer shuts the connection down when
the attempt's time is up, whatever it is waiting on (TLS handshake, request, status line, headers).
"""
from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Optional

from .targets import Target


class _Pinned:
    """Connects to the vetted address (not a fresh lookup of the host name) and can be cut off."""

    _raw: Optional[socket.socket] = None
    _address: str

    def _open(self, port: int, timeout: Optional[float]) -> socket.socket:
        self._raw = socket.create_connection((self._address, port), timeout)
        return self._raw

    def cut(self) -> None:
        """From another thread: a blocked read or write fails now."""
        raw = self._raw
        if raw is not None:
            try:
                socket.socket.shutdown(raw, socket.SHUT_RDWR)  # the plain socket's, under any TLS wrapper
            except OSError:
                pass


class _PinnedHTTPS(_Pinned, http.client.HTTPSConnection):
    """HTTPS to the vetted address, with the certificate checked for the URL's host name."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = target.address

    def connect(self) -> None:
        sock = self._open(self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(_Pinned, http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = self._open(self.port, self.timeout)


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """One POST; the HTTP status (redirects are answers, not followed). Raises TimeoutError when the
    whole exchange takes more than `timeout` s, OSError / HTTPException when it fails."""
    conn: _PinnedHTTP | _PinnedHTTPS = (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, timeout)
    deadline = time.monotonic() + timeout
    timer = threading.Timer(timeout, conn.cut)
    timer.daemon = True
    timer.start()
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        return conn.getresponse().status  # the status line and headers: the answer's body is not read
    except (OSError, http.client.HTTPException, ValueError):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no complete answer within {timeout:g} s") from None
        raise
    finally:
        timer.cancel()
        conn.close()


__all__ = ["post"]
