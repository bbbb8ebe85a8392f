"""Run the real service (`python -m entrypoints.api_server`, as `make run` does) in a subprocess."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ACE-Step's REST API guide (Korean), in the shared/ folder beside the repo: its client code and request
# bodies are run as written
SEED_DOC = Path(REPO).parent / "shared" / "seed" / "ace-step-rest-api-guide.ko.md"


def poll_until(what: str, predicate, timeout: float, interval: float = 0.1, describe=lambda: ""):
    """Call `predicate` until it returns something truthy (returned); past `timeout`, fail naming `what`
    (plus `describe()`, e.g. the logs of the processes involved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + describe())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, base_url: str, proc: subprocess.Popen, log_path: str):
        self.base_url, self.proc, self.log_path = base_url, proc, log_path

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "entrypoints.worker"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def wait_until(self, what: str, predicate, timeout: float, interval: float = 0.1):
        """Poll `predicate` until it returns something truthy (returned); past `timeout`, fail with the log."""
        return poll_until(what, predicate, timeout, interval, lambda: ":\n" + self.log()[-4000:])

    def query(self, task_id: str) -> dict:
        """The /query_result entry of one task."""
        return httpx.post(self.base_url + "/query_result", json={"task_id_list": [task_id]},
                          timeout=10).json()["data"][0]

    def wait_done(self, task_id: str, timeout: float = 240.0) -> dict:
        """The task's entry once it succeeded or failed."""
        return self.wait_until(f"task {task_id} to finish",
                               lambda: (e := self.query(task_id))["status"] in (1, 2) and e, timeout, interval=0.2)

    def wait_for_worker(self, timeout: float = 120.0) -> None:
        """Until a worker has loaded its models and published them (/v1/models shows them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.base_url + "/health", timeout=5)
            models = r.json()["data"].get("models") or []
            if models and all(m.get("random_weights") is not None for m in models):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("worker did not come up:\n" + self.log()[-4000:])


@contextlib.contextmanager
def live_server(data_dir: str, checkpoint_dir: str, workers: int = 1, env: Optional[dict] = None,
                log_path: Optional[str] = None) -> Iterator[LiveServer]:
    port = free_port()
    log_path = log_path or os.path.join(data_dir, f"server-{port}.log")
    os.makedirs(data_dir, exist_ok=True)
    # OPENROUTER_PORT=0: no second listener on a fixed port unless a test asks for one
    # Workers at the test's own CPU priority: on a loaded shared machine a nicer worker starves and
    # tests time out (test_e2e_service checks the priority with a value of its own).
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACESTEP_ALLOW_DOWNLOAD": "false", "OPENROUTER_PORT": "0",
                "ACESTEP_WORKER_NICE": "0", "PYTHONPATH": REPO, **(env or {})}
    cmd = [sys.executable, "-m", "entrypoints.api_server", "--port", str(port), "--data-dir", data_dir,
           "--checkpoint-dir", checkpoint_dir, "--workers", str(workers), "--log-level", "info"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=data_dir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not start:\n" + server.log()[-4000:])
            time.sleep(0.1)
        yield server
    finally:
        stop_service(proc)


def stop_service(proc: "subprocess.Popen[bytes]") -> None:
    """SIGTERM (the service drains), SIGKILL past 30 s, then SIGKILL to its whole session: a worker left
    behind never outlives the test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
