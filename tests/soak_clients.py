"""The soak's clients (tests/test_soak.py): the API as a process to kill -9 and restart, a /health
prober, a well-behaved submitter that retries through kills, webhook receivers (one answers, one
drips a byte at a time) and the hostile clients of issue 21 (chat bombs, /format_input bursts,
made-up Bearer / ai_token / X-Forwarded-For per request).

Each client sends from its own loopback address (127.0.0.x as the TCP source), so the API counts
each as the separate caller it is: its per-caller limits and request rate apply to that client alone,
as they would to separate machines, and made-up tokens or forwarding headers must not change that.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

import httpx

from handlers.openrouter.schema import MAX_PARTS, MAX_TEXT_CHARS
from tests.live_server import REPO, free_port, poll_until

LOAD_PEER, BOMB_PEER, FORMAT_PEER, ROTATE_PEER, FORWARD_PEER, PROBE_PEER = (
    "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.9")
ANSWERED_WITHIN = 1.0  # /health must answer within this, all through the soak
FORMAT_BURST = 60  # issue 21.3: 60 concurrent calls, within one caller's default burst
ROTATION_BURST = 60  # issue 21.2: 120 made-up tokens were all accepted against a limit of 50


class ApiProcess:
    """`acestep-api --workers 0` (both listeners, no workers: the soak's fork server runs those) on
    fixed ports, so a restart is found where the clients left it."""

    def __init__(self, data_dir: str, env: dict[str, str]):
        self.data_dir, self.env = data_dir, env
        self.port, self.chat_port = free_port(), free_port()
        self.base, self.chat_base = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.chat_port}"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.up = threading.Event()
        self.down_windows: list[tuple[float, float]] = []  # (killed, answering again), monotonic
        self.log_path = os.path.join(data_dir, "api.log")

    def start(self) -> None:
        cmd = [sys.executable, "-m", "entrypoints.api_server", "--workers", "0", "--host", "127.0.0.1",
               "--port", str(self.port), "--openrouter-port", str(self.chat_port), "--data-dir", self.data_dir]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        def answering() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "the API exited:\n" + self.log()[-3000:]
            try:
                return all(httpx.get(b + "/health", timeout=5).status_code in (200, 503)
                           for b in (self.base, self.chat_base))
            except httpx.TransportError:
                return False

        poll_until("the API to answer", answering, 180, interval=0.05)
        self.up.set()

    def kill(self) -> float:
        """kill -9; returns when it is gone. The caller restarts it with start() (see restart)."""
        assert self.proc is not None
        self.up.clear()
        killed = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        return killed

    def restart(self) -> float:
        """kill -9, start again; the seconds it answered nothing."""
        killed = self.kill()
        self.start()
        self.down_windows.append((killed, time.monotonic()))
        return time.monotonic() - killed

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def client_at(peer: str, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=peer), timeout=timeout)


def async_client_at(peer: str, timeout: float = 120.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=peer, limits=limits), timeout=timeout)


# -- /health, all through the soak --------------------------------------------------------------

@dataclasses.dataclass
class Probe:
    started: float
    ended: float
    url: str
    status: Optional[int]  # None: no answer (connection refused or reset)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class HealthProber:
    """GET /health on both listeners in turn, a new connection each time (as a load balancer checks),
    from its own address, and records every answer's latency."""

    def __init__(self, api: ApiProcess, interval: float = 0.1):
        self.api, self.interval = api, interval
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "HealthProber":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        transport = httpx.HTTPTransport(local_address=PROBE_PEER, limits=httpx.Limits(max_keepalive_connections=0))
        with httpx.Client(transport=transport, timeout=30) as client:
            urls = (self.api.base + "/health", self.api.chat_base + "/health")
            n = 0
            while not self._stop.wait(self.interval):
                url = urls[n % 2]
                n += 1
                started = time.monotonic()
                try:
                    status: Optional[int] = client.get(url).status_code
                except httpx.TransportError:
                    status = None
                self.probes.append(Probe(started, time.monotonic(), url, status))

    def split(self) -> tuple[list[Probe], list[Probe]]:
        """(probes while the API was up, probes that overlapped a planned kill and restart)."""
        up, down = [], []
        for p in self.probes:
            overlaps = any(p.started < back and p.ended > killed for killed, back in self.api.down_windows)
            (down if overlaps else up).append(p)
        return up, down


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- webhook receivers ------------------------------------------------------------------------

class Receiver:
    """Answers every POST 200 and records the task id and webhook-id it carried."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, str]] = []  # (task_id, webhook-id)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append((json.loads(body)["task_id"], self.headers["webhook-id"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def task_ids(self) -> set[str]:
        return {task_id for task_id, _ in self.deliveries}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the well-behaved load ----------------------------------------------------------------------

class LoadClient:
    """Submits each task until the API takes it: through kills (connection errors) with the same
    Idempotency-Key, so a submit the API recorded before it died is answered, not made twice; 429/503
    are waited out (at most a second: the soak's workers free a slot in far less than Retry-After)."""

    def __init__(self, api: ApiProcess):
        self.api = api
        self.client = client_at(LOAD_PEER)
        self.statuses: Counter[int] = Counter()
        self.connection_errors = 0
        self.resent_after_a_kill = 0  # submits whose connection died with the API, sent again with their key
        self.in_flight = threading.Event()  # set while a submit is on the wire (the API killer waits for it)

    def submit(self, key: str, **request: Any) -> httpx.Response:
        cut = False
        while True:
            self.api.up.wait(300)
            self.in_flight.set()
            try:
                r = self.client.post(self.api.base + "/release_task", headers={"Idempotency-Key": key}, **request)
            except httpx.TransportError:
                self.connection_errors += 1
                cut = True
                time.sleep(0.05)
                continue
            finally:
                self.in_flight.clear()
            self.resent_after_a_kill += cut
            cut = False
            self.statuses[r.status_code] += 1
            if r.status_code not in (429, 503):
                return r
            time.sleep(min(1.0, float(r.headers.get("Retry-After", "1"))))


# -- hostile clients: one round of each, answered with statuses by kind ---------------------------

Answers = list[tuple[str, str]]  # (kind, status as answered: "400", "200", "200 code 500", ...)


def answer_status(r: httpx.Response) -> str:
    """The HTTP status, plus the envelope's code when a 200 carries an error (e.g. a failed format task)."""
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
        code = r.json().get("code")
        if isinstance(code, int) and code != 200:
            return f"200 code {code}"
    return str(r.status_code)


async def chat_bombs(api: ApiProcess) -> Answers:
    """Bodies at the per-field limit (adversarial tags, parsed) and past it (refused unparsed), to the
    chat listener and the ACE-Step listener's chat route at once, while the prober reads /health."""
    at_limit = "<prompt>" * (MAX_TEXT_CHARS // len("<prompt>"))
    lyrics_at_limit = "<lyrics>" + "la " * ((MAX_TEXT_CHARS - 8) // 3)
    over = "<prompt>" * 32000  # issue 21.1's 256,000 characters
    # Both fields at their own limits, each full of its own opening tag: parsed, accepted, and run.
    fields_at_limit = "<prompt>" + "<prompt>" * 500 + "</prompt><lyrics>" + "<lyrics>" * 2040 + "</lyrics>"
    bodies = {
        "chat: <prompt> x 4096 (at the limit)": {"messages": [{"role": "user", "content": at_limit}]},
        "chat: unclosed <lyrics> at the limit": {"messages": [{"role": "user", "content": lyrics_at_limit}]},
        "chat: 16 parts at the limit": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": at_limit}] * MAX_PARTS}]},
        "chat: caption and lyrics of tags at their limits": {"messages": [{"role": "user",
                                                                             "content": fields_at_limit}]},
        "chat: <prompt> x 32000 (over)": {"messages": [{"role": "user", "content": over}]},
        "chat: a part over the limit": {"messages": [{"role": "user", "content": [{"type": "text", "text": over}]}]},
    }
    async with async_client_at(BOMB_PEER) as client:
        sent = [(kind, base) for kind in bodies for base in (api.chat_base, api.base)]
        answers = await asyncio.gather(*(client.post(base + "/v1/chat/completions", json=bodies[kind])
                                         for kind, base in sent))
    return [(kind, answer_status(r)) for (kind, _), r in zip(sent, answers)]


async def format_burst(api: ApiProcess) -> Answers:
    async with async_client_at(FORMAT_PEER) as client:
        answers = await asyncio.gather(*(client.post(api.base + "/format_input",
                                                     json={"prompt": f"song {i}", "lyrics": "la"})
                                         for i in range(FORMAT_BURST)))
    return [("format burst", answer_status(r)) for r in answers]


async def rotation(api: ApiProcess, round_no: int) -> tuple[Answers, dict[str, float]]:
    """A made-up Bearer token or body ai_token per request from one address, and a made-up
    X-Forwarded-For per request from another: each address is one caller whatever they say.
    Also returns, per address, the requests accepted and the most its request rate allows."""
    body = {"prompt": "rotating", "audio_duration": 10, "batch_size": 1}

    async def burst(peer: str, kind: Callable[[int], str], make: Callable[[int], dict[str, Any]]
                    ) -> tuple[Answers, int, float]:
        async with async_client_at(peer) as client:
            started = time.monotonic()
            answers = await asyncio.gather(*(client.post(api.base + "/release_task", **make(i))
                                             for i in range(ROTATION_BURST)))
            elapsed = time.monotonic() - started
        accepted = sum(r.status_code == 200 for r in answers)
        return [(kind(i), answer_status(r)) for i, r in enumerate(answers)], accepted, elapsed

    token = lambda i: ({"json": body, "headers": {"Authorization": f"Bearer rnd-{round_no}-{i}"}}  # noqa: E731
                       if i % 2 == 0 else {"json": {**body, "ai_token": f"rnd-{round_no}-{i}"}})
    forwarded = lambda i: {"json": body, "headers": {"X-Forwarded-For": f"203.0.113.{i % 250}"}}  # noqa: E731
    kind_token = lambda i: "made-up Bearer token" if i % 2 == 0 else "made-up body ai_token"  # noqa: E731
    (a1, ok1, t1), (a2, ok2, t2) = await asyncio.gather(
        burst(ROTATE_PEER, kind_token, token), burst(FORWARD_PEER, lambda i: "made-up X-Forwarded-For", forwarded))
    return a1 + a2, {"tokens_accepted": ok1, "tokens_elapsed": t1, "forwarded_accepted": ok2, "forwarded_elapsed": t2}


def hostile_round(api: ApiProcess, round_no: int) -> tuple[Answers, dict[str, float]]:
    async def main() -> tuple[Answers, dict[str, float]]:
        bombs, formats, (rotated, counts) = await asyncio.gather(chat_bombs(api), format_burst(api),
                                                                 rotation(api, round_no))
        return bombs + formats + rotated, counts

    return asyncio.run(main())
