"""Live demo servers (`make run` on the tiny random-weight model) for the client, CLI and Studio
tests: one with an API key, one without; session fixtures `keyed_server` / `open_server` in conftest.py.

Only the keyed one runs a worker: the open one is a second API process on the same data folder (the
embedded store is shared by processes, as with `acestep-worker`), so it starts in about a second
instead of loading torch and the models again."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from tests.live_server import LiveServer, live_server

API_KEY = "studio-test-key"
# What the tests generate: the shortest audio the API takes, few steps - the flow is under test, not the music.
QUICK = {"audio_duration": 10, "batch_size": 1, "inference_steps": 2}


@contextlib.contextmanager
def start_demo_server(root: Path, keyed: bool) -> Iterator[LiveServer]:
    data, checkpoints = str(root / "data"), str(root / "checkpoints")
    with live_server(data, checkpoints, workers=1 if keyed else 0,
                     env={"ACESTEP_API_KEY": API_KEY if keyed else ""}) as server:
        server.wait_for_worker()
        yield server
