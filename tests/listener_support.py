"""The ACE-Step API served in this process on the listener `acestep-api` builds
(entrypoints.api_server.listeners: uvicorn with the project's protocol and proxy settings)."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Iterator

from entrypoints.api_server import listeners
from handlers.app import create_app
from service.config import Settings
from service.embedded import make_embedded_backend
from tests.live_server import free_port


@contextlib.contextmanager
def listening(settings: Settings, **overrides) -> Iterator[tuple[str, int]]:
    """Yields (host, port) of the ACE-Step listener, on an embedded backend with no worker; the
    overrides (validated) apply to a copy of `settings`."""
    settings = Settings.model_validate({**settings.model_dump(), **overrides, "port": free_port(), "openrouter_port": 0})
    server = listeners(settings, create_app(settings, make_embedded_backend(settings)))[0]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the listener did not start"
        time.sleep(0.02)
    try:
        yield "127.0.0.1", settings.port
    finally:
        server.should_exit = True
        thread.join(10)
