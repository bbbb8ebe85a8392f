"""`acestep-api` (and `make run`): the API plus its workers on one machine.

The API serves in this process; each worker (ACESTEP_QUEUE_WORKERS, default 1) is a child
process running `acestep-worker` (entrypoints.worker) against the same backend, so a generation never blocks the
event loop and a crashed worker does not take the API down (it is restarted; its task is
redelivered).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from service.config import ENV_NAMES, Settings, load_settings
from handlers.openrouter.waiting import server_stopping as chat_server_stopping
from service.upstream_env import warn_unused_upstream_env
from service.observability.logs import configure_logging

from . import bootstrap, heap, http_protocol
from .fd_limit import raise_open_files_limit
from .cli_errors import user_errors

if TYPE_CHECKING:  # imported where used: uvicorn and FastAPI load once the settings are read
    import uvicorn
    from fastapi import FastAPI

log = logging.getLogger(__name__)

SHUTDOWN_STREAMS_SECONDS = 5


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="acestep-api", description="ACE-Step REST API server with workers")
    p.add_argument("--host", "--api-host", dest="host", help="bind address (ACESTEP_API_HOST, 127.0.0.1)")
    p.add_argument("--port", "--api-port", dest="port", type=int, help="port (ACESTEP_API_PORT, 8001)")
    p.add_argument("--api-key", help="require this key (ACESTEP_API_KEY)")
    p.add_argument("--openrouter-port", type=int,
                   help="port of the OpenAI-compatible API (OPENROUTER_PORT, 8002); 0 = off")
    p.add_argument("--config-path", help="primary DiT model (ACESTEP_CONFIG_PATH)")
    p.add_argument("--checkpoint-dir", help="where models live (ACESTEP_CHECKPOINT_DIR)")
    p.add_argument("--data-dir", help="task database and audio files (ACESTEP_DATA_DIR)")
    p.add_argument("--workers", type=int, help="worker processes (ACESTEP_QUEUE_WORKERS); 0 = API only")
    p.add_argument("--init-llm", nargs="?", const="true", help="load the 5Hz LM (ACESTEP_INIT_LLM)")
    p.add_argument("--lm-model-path", help="5Hz LM model (ACESTEP_LM_MODEL_PATH)")
    p.add_argument("--download-source", choices=["auto", "huggingface", "modelscope"],
                   help="accepted for compatibility; models download from the Hugging Face hub")
    p.add_argument("--log-level", default=os.environ.get("ACESTEP_API_LOG_LEVEL"),
                   help="debug, info, warning, error (ACESTEP_LOG_LEVEL, info)")
    p.add_argument("--debug", action="store_true",
                   help="tracebacks for start-up failures (ACESTEP_DEBUG=1); workers inherit it")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings({
        "host": args.host, "port": args.port, "api_key": args.api_key, "openrouter_port": args.openrouter_port,
        "config_path": args.config_path, "checkpoint_dir": args.checkpoint_dir,
        "data_dir": args.data_dir, "queue_workers": args.workers,
        "init_llm": args.init_llm, "lm_model_path": args.lm_model_path,
        "log_level": args.log_level.upper() if args.log_level else None,
    })


def child_env(settings: Settings) -> dict[str, Any]:
    """The environment a worker process needs to see the same settings as the API."""
    env = dict(os.environ)
    # Each worker's torch would use every core; several of them then spin against each other.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, settings.queue_workers))))
    for name, attr in ENV_NAMES.items():
        value = getattr(settings, attr)
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name] = str(value)
    return env


def _worker_preexec(niceness: int) -> Callable[[], None]:
    """What the worker child runs before it starts: a lower CPU priority than the API's (a
    generation keeps every core busy; at equal priority polls wait behind it, see bench/load.py
    --busy-worker), and a life tied to the launcher's."""
    def prepare() -> None:
        os.nice(niceness)
        _die_with_parent()
    return prepare


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerSupervisor:
    """Keeps N worker processes alive; restarts one that dies (its task is redelivered)."""

    def __init__(self, settings: Settings, count: int, log_level: str):
        self.settings, self.count, self.log_level = settings, count, log_level
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="worker-supervisor")

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Grace below stop()'s timeout: a running task is released, not killed mid-way.
        # --supervised: the worker ignores the terminal's Ctrl+C (SIGINT reaches the whole process
        # group); it acts on the SIGTERMs this supervisor forwards, so one Ctrl+C is one signal.
        return subprocess.Popen([sys.executable, "-m", "entrypoints.worker", "--log-level", self.log_level,
                                 "--grace-seconds", str(self.settings.worker_stop_grace), "--supervised"],
                                env=child_env(self.settings), preexec_fn=_worker_preexec(self.settings.worker_nice))

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        # A worker that keeps dying at start-up (say, a model that cannot load) is restarted
        # with a growing pause instead of in a tight loop.
        backoff = [1.0] * len(self.procs)
        started = [time.monotonic()] * len(self.procs)
        while not self._stopping.wait(0.5):
            for i, proc in enumerate(self.procs):
                if proc.poll() is None or self._stopping.is_set():
                    continue
                lived = time.monotonic() - started[i]
                backoff[i] = 1.0 if lived > 60 else min(backoff[i] * 2, 60.0)
                log.error("worker %d exited with %s after %.0fs; restarting in %.0fs",
                          proc.pid, proc.returncode, lived, backoff[i])
                if self._stopping.wait(backoff[i]):
                    return
                self.procs[i] = self._spawn()
                started[i] = time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def abort(self) -> None:
        """A second SIGTERM: the workers give their running tasks back instead of finishing them."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()

    def stop(self, timeout: Optional[float] = None, abort: bool = False) -> None:
        """Workers finish their running task (drain), up to their grace period; `abort` gives it back."""
        if timeout is None:  # past the workers' grace: a running task is released, not killed mid-way
            timeout = self.settings.worker_stop_grace + 10
        self._stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        if abort:
            time.sleep(0.1)  # let each worker install its drain state before the second signal
            self.abort()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


class _Listener:
    """Builds a uvicorn server that leaves signals to main(), which stops every listener together."""

    @staticmethod
    def server(app: FastAPI, host: str, port: int, settings: Settings, protocol: type) -> uvicorn.Server:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        # log_config=None keeps our handler; the app writes its own access lines, with request ids.
        # Open streams (SSE) get a few seconds to end once shutdown starts.
        # X-Forwarded-For / -Proto only from ACESTEP_TRUSTED_PROXIES: uvicorn's default believes any
        # loopback peer, so a client on the host (or behind an untrusted hop) could pick its address.
        # `protocol`: h11 with a deadline per request head and a cap on connections waiting for one
        # (entrypoints/http_protocol.py), shared by the listeners of the process.
        trusted = settings.trusted_proxies
        return Server(uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(),
                                     log_config=None, access_log=False,
                                     timeout_graceful_shutdown=SHUTDOWN_STREAMS_SECONDS,
                                     proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None,
                                     http=protocol, h11_max_incomplete_event_size=http_protocol.MAX_HEAD_BYTES))


def listeners(settings: Settings, app: FastAPI) -> list[uvicorn.Server]:
    """The ACE-Step API on ACESTEP_API_HOST:PORT and the OpenAI-compatible one on OPENROUTER_HOST:PORT."""
    protocol = http_protocol.header_limited(settings.header_timeout, http_protocol.MAX_WAITING)
    servers = [_Listener.server(app, settings.host, settings.port, settings, protocol)]
    if settings.openrouter_port:
        servers.append(_Listener.server(bootstrap.build_openrouter_app(settings, app),
                                        settings.openrouter_host, settings.openrouter_port, settings, protocol))
        log.info("OpenAI-compatible API on http://%s:%d", settings.openrouter_host, settings.openrouter_port)
    return servers


async def _serve_all(servers: list[uvicorn.Server]) -> None:
    serving = [asyncio.ensure_future(server.serve()) for server in servers]
    # Once every listener is up, what start-up built is settled out of the collector's way.
    while not all(server.started for server in servers) and not any(task.done() for task in serving):
        await asyncio.sleep(0.05)
    heap.settle()
    await asyncio.gather(*serving)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.debug:
        os.environ["ACESTEP_DEBUG"] = "1"  # the worker processes' environment too
    with user_errors("acestep-api"):  # a bad setting: one line naming it, not a traceback
        settings = settings_from_args(args)
        configure_logging(settings.log_level, settings.log_format)
        settings = bootstrap.resolve_secrets(settings)
        app = bootstrap.build_app(settings)
    supervisor = WorkerSupervisor(settings, settings.queue_workers, settings.log_level)
    if settings.queue_workers > 0:
        supervisor.start()
    log.info("ACE-Step API on http://%s:%d (backend %s, data %s, %d worker process(es))",
             settings.host, settings.port, settings.backend, os.path.abspath(settings.data_dir),
             settings.queue_workers)
    warn_unused_upstream_env(os.environ)
    raise_open_files_limit()  # slow clients each hold a descriptor until their deadline
    servers = listeners(settings, app)
    # Signals are ours, not uvicorn's: the first Ctrl+C / SIGTERM stops every listener and lets
    # the workers finish their running task (drain); another one while they drain makes them give
    # it back at once (abort).
    received: list[int] = []

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        chat_server_stopping.set()
        for server in servers:
            server.force_exit = server.should_exit  # a second signal drops open connections
            server.should_exit = True
        if supervisor.stopping:
            log.warning("second signal: workers give their running tasks back now")
            supervisor.abort()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        asyncio.run(_serve_all(servers))
    finally:
        supervisor.stop(abort=len(received) > 1)
    if received:
        log.info("stopped by signal %d", received[-1])


if __name__ == "__main__":
    main()
