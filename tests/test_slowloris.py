"""Slow request heads (slowloris) cannot hold `acestep-api`'s connections (issue 21, item 8).

A connection must send each request head within ACESTEP_HEADER_TIMEOUT of connecting or of its
last response, and past http_protocol.MAX_WAITING connections waiting for one, the oldest is
closed. The waits below are for the server to close a socket: 30 s is a ceiling that only a
server without the deadline reaches, not a timing the test depends on.
"""
from __future__ import annotations

import socket

import httpx

from entrypoints import http_protocol
from tests.listener_support import listening

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: "
CLOSED_WITHIN = 30.0


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closes the connection (recv sees EOF); False if it stays open CLOSED_WITHIN s."""
    sock.settimeout(CLOSED_WITHIN)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_a_connection_that_never_finishes_its_head_is_closed(settings):
    with listening(settings, header_timeout=0.3) as address, socket.create_connection(address) as sock:
        sock.sendall(PARTIAL_HEAD)
        assert _closed_by_server(sock)


def test_a_keep_alive_connection_must_finish_its_next_head_too(settings):
    with listening(settings, header_timeout=0.3) as address, socket.create_connection(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\n\r\n")
        sock.settimeout(CLOSED_WITHIN)
        assert sock.recv(65536).startswith(b"HTTP/1.1 ")  # the first request is answered
        sock.sendall(PARTIAL_HEAD)  # each byte would have cancelled uvicorn's keep-alive timer
        assert _closed_by_server(sock)


def test_past_the_cap_the_longest_waiting_connection_is_closed_and_health_answers(settings, monkeypatch):
    monkeypatch.setattr(http_protocol, "MAX_WAITING", 4)
    with listening(settings, header_timeout=300.0) as address:  # only the cap closes anything here
        socks = [socket.create_connection(address) for _ in range(6)]
        try:
            for sock in socks:
                sock.sendall(PARTIAL_HEAD)
            assert _closed_by_server(socks[0]) and _closed_by_server(socks[1])
            host, port = address
            assert httpx.get(f"http://{host}:{port}/health", timeout=CLOSED_WITHIN).status_code in (200, 503)
        finally:
            for sock in socks:
                sock.close()
