"""/format_input latency with and without a generation running, interactive lane off vs on (issue 23).

Runs the real processes on both backends, one after the other, from this tree:
- embedded: `python -m entrypoints.api_server --workers 1` (SQLite, a worker process);
- aws: moto's server in this process, the API under uvicorn (`entrypoints.bootstrap:app_from_env`) and
  `python -m entrypoints.worker --backend aws`, as tests/test_aws_e2e.py runs them (no IAM roles here).
The worker serves the random-weight demo DiT and demo 5 Hz LM the launcher builds (labelled as such in every
result); figures are this machine's CPU, not a GPU's.

"lane off": aws, ACESTEP_INTERACTIVE_QUEUE_URL empty (one queue, the fallback of configs from before the
lane); embedded, whose queue always orders by lane, has the lane turned off by this bench patching
service.embedded.intake.is_interactive to False in the API process (the only way to get the old order).

Per (backend, lane): N /format_input calls one after another with the worker idle, then N calls each made
while one generation runs and QUEUED more wait (topped up before each call). Generations are not batched
together (ACESTEP_BATCH_TASKS=false), so one engine call is one generation.

    .venv/bin/python bench/format_latency.py [--calls 5] [--queued 2] [--steps 50] [--seconds 60] [--backends embedded,aws]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.aws_support import FAKE_AWS_ENV, aws_settings, moto_server  # noqa: E402
from tests.live_server import free_port, poll_until, stop_service  # noqa: E402

FORMAT_BODY = {"prompt": "pop rock", "lyrics": "[verse] walking down the street",
               "param_obj": json.dumps({"duration": 30, "language": "en"})}
LANE_OFF_API = ("import runpy, sys; import service.embedded.intake as intake; "
                "intake.is_interactive = lambda request: False; "  # the bench's lane-off switch (see above)
                "sys.argv = ['api_server'] + sys.argv[1:]; runpy.run_module('entrypoints.api_server', run_name='__main__')")


class Deployment:
    """The API (and its worker) of one backend, lane on or off."""

    def __init__(self, root: Path, ckpt: Path, backend: str, lane: bool, endpoint: str = ""):
        self.root, self.ckpt, self.backend, self.lane, self.endpoint = root, ckpt, backend, lane, endpoint
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACESTEP_ALLOW_DOWNLOAD": "false", "OPENROUTER_PORT": "0",
                    "ACESTEP_DEMO_IF_MISSING": "true", "ACESTEP_DEVICE": "cpu", "ACESTEP_WORKER_NICE": "0",
                    "ACESTEP_RATE_LIMIT_RPS": "0", "ACESTEP_FORMAT_TIMEOUT": "600",
                    "ACESTEP_BATCH_TASKS": "false", "PYTHONPATH": str(REPO)}

    def start(self) -> None:
        data = self.root / f"{self.backend}-{'lane' if self.lane else 'nolane'}"
        data.mkdir(parents=True)
        if self.backend == "embedded":
            args = ["--port", str(self.port), "--data-dir", str(data), "--checkpoint-dir", str(self.ckpt),
                    "--workers", "1", "--log-level", "warning"]
            cmd = ["-m", "entrypoints.api_server", *args] if self.lane else ["-c", LANE_OFF_API, *args]
            self._popen("api", cmd, data, self.env)
        else:
            self.env |= self._aws_env(data)
            self._popen("api", ["-m", "uvicorn", "--factory", "entrypoints.bootstrap:app_from_env", "--host",
                                "127.0.0.1", "--port", str(self.port), "--log-level", "warning"], data, self.env)
            self._popen("worker", ["-m", "entrypoints.worker", "--backend", "aws", "--checkpoint-dir",
                                   str(self.ckpt)], data, self.env)
        poll_until("the worker to publish its models", self._worker_up, timeout=600, interval=0.5)

    def _aws_env(self, data: Path) -> dict[str, str]:
        from service.aws.provision import provision

        os.environ.update(FAKE_AWS_ENV)
        tag = "lane" if self.lane else "nolane"
        s = provision(aws_settings(data, aws_endpoint_url=self.endpoint, table_name=f"bench-{tag}",
                                   queue_url=f"bench-{tag}", bucket=f"bench-{tag}",
                                   interactive_queue_url=f"bench-{tag}-interactive" if self.lane else ""))
        return {**FAKE_AWS_ENV, "ACESTEP_BACKEND": "aws", "ACESTEP_AWS_ENDPOINT_URL": self.endpoint,
                "ACESTEP_AWS_REGION": "us-east-1", "ACESTEP_TABLE_NAME": s.table_name,
                "ACESTEP_QUEUE_URL": s.queue_url, "ACESTEP_DLQ_URL": s.dlq_url,
                "ACESTEP_INTERACTIVE_QUEUE_URL": s.interactive_queue_url, "ACESTEP_BUCKET": s.bucket,
                "ACESTEP_SIGNING_SECRET_ARN": s.signing_secret_arn, "ACESTEP_WEBHOOK_SECRET_ARN": s.webhook_secret_arn,
                "ACESTEP_DATA_DIR": str(data), "ACESTEP_PUBLIC_BASE_URL": self.base}

    def _popen(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        with open(cwd / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def _worker_up(self) -> bool:
        for proc in self.procs:
            assert proc.poll() is None, f"{proc.args[:3]} exited: see the logs under {self.root}"
        try:
            models = httpx.get(self.base + "/health", timeout=5).json()["data"].get("models") or []
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return bool(models) and all(m.get("random_weights") is not None for m in models)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_service(proc)


def format_call(client: httpx.Client) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.post("/format_input", json=FORMAT_BODY)
    return time.perf_counter() - t0, r.status_code


def submit_generation(client: httpx.Client, steps: int, seconds: float) -> str:
    r = client.post("/release_task", json={"prompt": "bench generation", "audio_duration": seconds, "batch_size": 1,
                                           "inference_steps": steps, "audio_format": "wav"})
    assert r.status_code == 200, r.text
    return r.json()["data"]["task_id"]


def unfinished(client: httpx.Client, ids: list[str]) -> list[str]:
    if not ids:
        return []
    entries = client.post("/query_result", json={"task_id_list": ids}).json()["data"]
    return [e["task_id"] for e in entries if e["status"] == 0]


def measure(dep: Deployment, calls: int, queued: int, steps: int, seconds: float) -> dict:
    with httpx.Client(base_url=dep.base, timeout=900) as client:
        format_call(client)  # the LM's first call (warm-up), not counted
        idle = [format_call(client) for _ in range(calls)]
        for _ in range(2):  # the first warms the DiT up; the second, alone, is timed
            t0 = time.perf_counter()
            one = submit_generation(client, steps, seconds)
            poll_until("a generation to finish", lambda: not unfinished(client, [one]), timeout=900, interval=0.2)
            generation_s = time.perf_counter() - t0
        busy, pending = [], []
        for _ in range(calls):
            pending = unfinished(client, pending)
            while len(pending) < queued + 1:  # one running, `queued` waiting
                pending.append(submit_generation(client, steps, seconds))
            time.sleep(1.5)  # the worker has taken the first: it runs while the others wait
            busy.append(format_call(client))
        poll_until("the generations to finish", lambda: not unfinished(client, pending), timeout=1800, interval=0.5)
    return {"idle": idle, "busy": busy, "generation_s": generation_s}


def summary(samples: list[tuple[float, int]]) -> str:
    times = [t for t, _ in samples]
    codes = sorted({c for _, c in samples})
    return f"p50 {statistics.median(times):.2f} s, max {max(times):.2f} s (HTTP {','.join(map(str, codes))})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5, help="format calls per case")
    p.add_argument("--queued", type=int, default=2, help="generations waiting behind the running one")
    p.add_argument("--steps", type=int, default=50, help="diffusion steps of each generation (its length)")
    p.add_argument("--seconds", type=float, default=60, help="audio_duration of each generation")
    p.add_argument("--backends", default="embedded,aws")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="format-latency-"))
    ckpt = root / "checkpoints"
    results: list[tuple[str, bool, dict]] = []
    endpoint: Optional[str] = None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    with moto_server() as moto:
        for backend in args.backends.split(","):
            for lane in (False, True):
                endpoint = moto if backend == "aws" else ""
                dep = Deployment(root, ckpt, backend, lane, endpoint)
                try:
                    dep.start()
                    results.append((backend, lane, measure(dep, args.calls, args.queued, args.steps, args.seconds)))
                finally:
                    dep.stop()
                r = results[-1][2]
                print(f"{backend:8} lane {'on ' if lane else 'off'} | idle: {summary(r['idle'])} | "
                      f"generation running, {args.queued} queued: {summary(r['busy'])} | "
                      f"one generation alone {r['generation_s']:.1f} s", flush=True)
    print(json.dumps({"calls": args.calls, "queued": args.queued, "steps": args.steps, "seconds": args.seconds,
                      "logs": str(root),
                      "results": [{"backend": b, "lane": lane, **r} for b, lane, r in results]}))


if __name__ == "__main__":
    main()
