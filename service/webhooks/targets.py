"""Which webhook URLs this server will call: http(s) to public addresses only (no SSRF).

A task's webhook_url is checked when the task is submitted (a 400 says why) and again before every
delivery attempt, and the delivery connects to the address that passed the check, so a name that
re-resolves to a private address in between (DNS rebinding) gets nowhere. Private, loopback,
link-local (cloud metadata), multicast and reserved addresses are refused unless
ACESTEP_WEBHOOK_ALLOW_PRIVATE is set (a receiver on the same network, tests).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

MAX_URL = 2048
Resolver = Callable[[str, int], list[str]]


class WebhookRefused(ValueError):
    """The URL may not be called; the message says why (client-facing)."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # path + query, as sent in the request line
    address: str  # the vetted IP the delivery connects to


def resolve(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def check_target(url: str, allow_private: bool, resolver: Resolver = resolve) -> Target:
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise WebhookRefused(f"webhook_url: must be an http(s) URL of at most {MAX_URL} characters")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook_url: must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise WebhookRefused("webhook_url: credentials in the URL are not accepted")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("webhook_url: the port is not valid") from None
    try:
        addresses = resolver(parts.hostname, port)
    except (OSError, UnicodeError):
        raise WebhookRefused(f"webhook_url: cannot resolve {parts.hostname!r}") from None
    if not addresses:
        raise WebhookRefused(f"webhook_url: cannot resolve {parts.hostname!r}")
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not ip.is_global or ip.is_multicast:
                raise WebhookRefused(f"webhook_url: {parts.hostname!r} is a private, loopback or reserved address "
                                     f"({address}); this server only calls public hosts")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url.strip(), parts.scheme, parts.hostname, port, path, addresses[0])


__all__ = ["Target", "WebhookRefused", "check_target", "resolve"]
