"""Which webhook URLs this server will call: http(s) to public addresses only (no SSRF).

A task's webhook_url is checked when the task is submitted (a 400 says why) and again before every
delivery attempt, and the delivery connects to the address that passed the check, so a name that
re-resolves to a private address in between (DNS rebinding) gets nowhere. Private, loopback,
link-local (cloud metadata), multicast and reserved addresses are refused unless
ACESTEP_WEBHOOK_ALLOW_PRIVATE is set (a receiver on the same network, tests); so are IPv6 forms
that carry such an IPv4 address inside (NAT64, 6to4, IPv4-compatible, IPv4-mapped).

Names are resolved in a small pool of their own with a time limit: a slow or silent DNS server
costs the submit at most RESOLVE_SECONDS and never holds the event loop or the API's thread pool
(`vet_target` is the request path's way in).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable, Optional, Union
from urllib.parse import SplitResult, urlsplit

MAX_URL = 2048
RESOLVE_SECONDS = 5.0
Resolver = Callable[[str, int], list[str]]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Lookups that outlive their time limit keep their thread until the OS gives up; a small pool of its
# own bounds how many can pile up, and nothing else waits behind them.
_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local use, never a public host
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


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


@dataclass(frozen=True)
class _Parsed:
    url: str
    parts: SplitResult
    host: str
    port: int


def resolve(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def resolve_within(timeout: float) -> Resolver:
    """`resolve` in the DNS pool, given up after `timeout` s (socket.timeout, an OSError)."""
    def lookup(host: str, port: int) -> list[str]:
        try:
            return _DNS_POOL.submit(lambda: resolve(host, port)).result(timeout)
        except concurrent.futures.TimeoutError:
            raise socket.timeout(f"no answer in {timeout:g} s") from None
    return lookup


def embedded_ipv4(ip: IPAddress) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address carries and reaches (NAT64, 6to4, mapped, compatible), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 0xFFFF):  # ::1 and :: are not IPv4 forms
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    if not ip.is_global or ip.is_multicast or ip in _NAT64_LOCAL:
        return False
    inner = embedded_ipv4(ip)
    return inner is None or (inner.is_global and not inner.is_multicast)


def parse_url(url: object) -> _Parsed:
    """Checks what needs no network: scheme, host, port, no credentials."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise WebhookRefused(f"webhook_url: must be an http(s) URL of at most {MAX_URL} characters")
    try:  # "http://[::1": urlsplit raises rather than answers
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as exc:
        raise WebhookRefused(f"webhook_url: not a valid URL ({exc})") from None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("webhook_url: the port is not valid") from None
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookRefused("webhook_url: must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise WebhookRefused("webhook_url: credentials in the URL are not accepted")
    return _Parsed(url.strip(), parts, host, port)


def _literal(host: str) -> Optional[str]:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def _target(parsed: _Parsed, addresses: list[str], allow_private: bool) -> Target:
    if not addresses:
        raise WebhookRefused(f"webhook_url: cannot resolve {parsed.host!r}")
    if not allow_private:
        for address in addresses:
            if not is_public(ipaddress.ip_address(address.split("%", 1)[0])):
                raise WebhookRefused(f"webhook_url: {parsed.host!r} is a private, loopback or reserved address "
                                     f"({address}); this server only calls public hosts")
    parts = parsed.parts
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parsed.url, parts.scheme, parsed.host, parsed.port, path, addresses[0])


def _unresolvable(parsed: _Parsed, exc: BaseException) -> WebhookRefused:
    why = " (the lookup timed out)" if isinstance(exc, (socket.timeout, asyncio.TimeoutError)) else ""
    return WebhookRefused(f"webhook_url: cannot resolve {parsed.host!r}{why}")


def check_target(url: str, allow_private: bool, resolver: Optional[Resolver] = None) -> Target:
    """Blocking (a delivery's thread): the lookup is bounded by RESOLVE_SECONDS unless `resolver` is given."""
    parsed = parse_url(url)
    literal = _literal(parsed.host)
    if literal is not None:
        return _target(parsed, [literal], allow_private)
    try:
        addresses = (resolver or resolve_within(RESOLVE_SECONDS))(parsed.host, parsed.port)
    except (OSError, UnicodeError) as exc:
        raise _unresolvable(parsed, exc) from None
    return _target(parsed, addresses, allow_private)


async def vet_target(url: str, allow_private: bool, timeout: Optional[float] = None) -> Target:
    """check_target for the request path: the lookup runs in the DNS pool, the event loop waits at most
    `timeout` s (RESOLVE_SECONDS)."""
    timeout = RESOLVE_SECONDS if timeout is None else timeout
    parsed = parse_url(url)
    literal = _literal(parsed.host)
    if literal is not None:
        return _target(parsed, [literal], allow_private)
    try:
        lookup = _DNS_POOL.submit(lambda: resolve(parsed.host, parsed.port))  # `resolve` as it is now (tests)
        addresses = await asyncio.wait_for(asyncio.wrap_future(lookup), timeout)
    except (OSError, UnicodeError, asyncio.TimeoutError) as exc:
        raise _unresolvable(parsed, exc) from None
    return _target(parsed, addresses, allow_private)


__all__ = ["RESOLVE_SECONDS", "Target", "WebhookRefused", "check_target", "embedded_ipv4", "is_public",
           "parse_url", "resolve", "resolve_within", "vet_target"]
