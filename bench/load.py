"""Load on the API: `/query_result` at a fixed request rate, `/release_task` at fixed concurrency.

Starts the real API (`python -m entrypoints.api_server`, embedded backend, no worker unless
`--busy-worker`) on a fresh data dir, seeds finished tasks with realistic results straight into
its store, then drives it from this process with a small HTTP/1.1 keep-alive client:

- `/query_result` is open-loop: request i is due at t0 + i/rate whether or not earlier ones have
  answered, and its latency counts from when it was due, so a server that falls behind shows it
  (no coordinated omission).
- `/release_task` runs N clients back to back (closed loop) and reports throughput and latency.
- `bare` is a bare FastAPI app (one route returning a constant dict) served by the same uvicorn in
  the same run: the floor this machine gives a FastAPI route. `bare20` is the same app answering
  the very bytes of the 20-id poll (read from a file once): the floor for a response that size,
  load generator's reading of it included.

With `--busy-worker` a worker process (tiny demo model) generates 240 s songs during the whole
run, so the figures show whether the API slows down while the worker generates.

    .venv/bin/python bench/load.py [--rate 500] [--seconds 10] [--busy-worker]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.request import GenerationRequest  # noqa: E402  (torch-free)
from service.config import Settings  # noqa: E402
from service.embedded import make_embedded_backend  # noqa: E402
from service.records import AudioFile, TaskRecord, TaskResult  # noqa: E402

BARE_APP = """
import functools, os
from fastapi import FastAPI
from fastapi.responses import Response
app = FastAPI()
@app.post("/bare")
async def bare():
    return {"data": [], "code": 200, "error": None, "timestamp": 0, "extra": None}
@functools.cache
def sized_body():
    with open(os.path.join(os.path.dirname(__file__), "bare_body.json"), "rb") as f:
        return f.read()
@app.post("/bare_sized")
async def bare_sized():
    return Response(sized_body(), media_type="application/json")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_finished(data_dir: str, count: int) -> list[str]:
    """`count` succeeded tasks shaped like the engine's (2 mp3s each, full generation_info)."""
    backend = make_embedded_backend(Settings(data_dir=data_dir))
    ids = []
    for _ in range(count):
        task_id = str(uuid.uuid4())
        request = GenerationRequest(prompt="upbeat synth pop with a driving bass line and airy female vocals",
                                    lyrics="[verse]\n" + "walking down the neon street tonight\n" * 6,
                                    audio_duration=30, batch_size=2, inference_steps=8, model="acestep-v15-turbo")
        backend.store.create(TaskRecord(task_id=task_id, request=request))
        record = backend.store.claim(task_id, "bench")
        assert record is not None
        audios = [AudioFile(key=f"outputs/{task_id}/1-{i}.mp3", format="mp3", seed=1234 + i, duration=30.0,
                            sample_rate=48000, channels=2) for i in range(2)]
        info = {"inference_steps": 8, "guidance_scale": 7.0, "shift": 3.0, "infer_method": "ode",
                "device": "cpu", "dtype": "float32", "batch_size": 2, "audio_format": "mp3",
                "timings": {"text_encoder": 0.008, "dit": 0.047, "vae_decode": 0.913, "audio_encode": 0.944},
                "notes": ["a demo model"]}
        result = TaskResult(audios=audios, metas={"bpm": 120, "duration": 30.0, "genres": "pop",
                                                  "keyscale": "C major", "timesignature": "4"},
                            generation_info=info, dit_model="acestep-v15-turbo", lm_model="none")
        backend.store.finish(task_id, record.attempt, result=result, blob_keys=[a.key for a in audios])
        ids.append(task_id)
    return ids


@contextlib.contextmanager
def serve(cmd: list[str], env: dict, port: int, log_path: str, cwd: str = ROOT) -> Iterator[subprocess.Popen]:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {log_path}")
            time.sleep(0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- a minimal HTTP/1.1 keep-alive client (cheaper per request than httpx, so the server gets the cores) --

class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body


async def fetch(port: int, raw: bytes) -> bytes:
    """One request's response body."""
    connection = Connection(port)
    status, body = await connection.request(raw)
    assert connection.writer is not None
    connection.writer.close()
    if status != 200:
        raise SystemExit(f"HTTP {status}: {body[:300]!r}")
    return body


def post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def summary(latencies: list[float], seconds: float, errors: int, response_bytes: int) -> dict:
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"requests": len(lat), "rps": len(lat) / seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "max_ms": lat[-1] * 1000 if lat else float("nan"), "errors": errors, "bytes": response_bytes}


async def open_loop(port: int, raw: bytes, rate: float, seconds: float, max_conns: int = 64) -> dict:
    """Request i is due at t0 + i/rate; latency counts from then (queueing for a connection included)."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(max_conns):
        idle.put_nowait(Connection(port))
    latencies: list[float] = []
    errors = [0]
    size = [0]

    async def one(due: float) -> None:
        conn = await idle.get()
        try:
            status, body = await conn.request(raw)
            if status != 200:
                errors[0] += 1
            size[0] = len(body)
        except (OSError, asyncio.IncompleteReadError):
            errors[0] += 1
            conn = Connection(port)
        finally:
            idle.put_nowait(conn)
        latencies.append(time.perf_counter() - due)

    loop_start = time.perf_counter()
    total = int(rate * seconds)
    tasks = []
    for i in range(total):
        due = loop_start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    return summary(latencies, time.perf_counter() - loop_start, errors[0], size[0])


async def closed_loop(port: int, make_raw, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()

    async def client() -> None:
        conn = Connection(port)
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                status, _ = await conn.request(make_raw())
                if status != 200:
                    errors[0] += 1
            except (OSError, asyncio.IncompleteReadError):
                errors[0] += 1
                conn = Connection(port)
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(client() for _ in range(clients)))
    return summary(latencies, time.perf_counter() - started, errors[0], 0)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(name: str, r: dict, cpu: Optional[float] = None) -> str:
    cpu_ms = f"{cpu * 1000 / r['requests']:.2f}" if cpu is not None and r["requests"] else ""
    return (f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
            f"| {r['errors']} | {cpu_ms} | {r['bytes'] or ''} |")


def measured(pid: int, coro) -> tuple[dict, float]:
    before = cpu_seconds(pid)
    result = asyncio.run(coro)
    return result, cpu_seconds(pid) - before


def busy_worker_env(checkpoint_dir: str) -> dict:
    """Build the tiny demo model once so the worker has something to generate with."""
    if not os.path.isdir(os.path.join(checkpoint_dir, "acestep-v15-turbo")):
        subprocess.run([sys.executable, "-m", "entrypoints.models", "make-tiny",
                        os.path.join(checkpoint_dir, "acestep-v15-turbo")], cwd=ROOT, check=True)
    return {"ACESTEP_CHECKPOINT_DIR": checkpoint_dir}


def keep_worker_busy(port: int, until: float) -> None:
    """Submit 240 s songs so that one is always waiting while the measurements run."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < until:
        try:
            body = httpx.get(url + "/v1/stats", timeout=10).json()["data"]
            if body.get("jobs", {}).get("queued", 0) < 2:
                httpx.post(url + "/release_task", timeout=10,
                           json={"prompt": "busy", "audio_duration": 240, "inference_steps": 8})
        except httpx.HTTPError:
            return  # the server has stopped: the run is over
        time.sleep(1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=500, help="offered /query_result requests per second")
    p.add_argument("--seconds", type=float, default=10, help="length of each measurement")
    p.add_argument("--busy-worker", action="store_true", help="a worker generates during the run")
    p.add_argument("--only", default="", help="comma-separated subset: bare,bare20,query1,query20,release")
    p.add_argument("--server-repo", default=ROOT,
                   help="serve the API from this checkout (e.g. a worktree of the previous commit, for before/after)")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    data_dir = tempfile.mkdtemp(prefix="acestep-load-")
    ids = seed_finished(data_dir, 20)
    port = free_port()
    repo = os.path.abspath(args.server_repo)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACESTEP_ALLOW_DOWNLOAD": "false", "PYTHONPATH": repo,
           "ACESTEP_LOG_LEVEL": "WARNING", "ACESTEP_QUEUE_MAXSIZE": "100000",
           # one caller submits everything here: lift the per-caller limits (issue 11) so every submit counts
           "ACESTEP_RATE_LIMIT_RPS": "0", "ACESTEP_CALLER_MAX_QUEUED": "1000000", "ACESTEP_CALLER_MAX_ACTIVE": "1000000"}
    workers = "0"
    if args.busy_worker:
        env.update(busy_worker_env(os.path.join(tempfile.gettempdir(), "acestep-load-ckpt")))
        workers = "1"
    bare_path = os.path.join(data_dir, "bare_app.py")
    with open(bare_path, "w") as f:
        f.write(BARE_APP)
    bare_port = free_port()
    api = [sys.executable, "-m", "entrypoints.api_server", "--port", str(port), "--data-dir", data_dir,
           "--workers", workers, "--log-level", "warning"]
    bare = [sys.executable, "-m", "uvicorn", "--app-dir", data_dir, "bare_app:app", "--port", str(bare_port),
            "--log-level", "warning", "--no-access-log"]
    print(f"load on the API, {os.cpu_count()} CPUs, offered {args.rate:.0f} req/s for {args.seconds:.0f} s per row"
          f"{', a worker generating 240 s songs meanwhile' if args.busy_worker else ''}; API from {repo}\n")
    print("| route | req/s | p50 ms | p99 ms | max ms | errors | server CPU ms/req | response bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with serve(api, env, port, os.path.join(data_dir, "api.log"), cwd=repo) as proc, \
            serve(bare, env, bare_port, os.path.join(data_dir, "bare.log")) as bare_proc:
        if args.busy_worker:
            import threading
            busy = threading.Thread(target=keep_worker_busy, args=(port, time.monotonic() + 3600), daemon=True)
            busy.start()
            time.sleep(5)  # let the worker load and start generating
        answer20 = asyncio.run(fetch(port, post("/query_result", {"task_id_list": ids})))
        with open(os.path.join(data_dir, "bare_body.json"), "wb") as f:
            f.write(answer20)
        rows = [("bare", "bare FastAPI route (same uvicorn)", bare_proc.pid,
                 lambda: open_loop(bare_port, post("/bare", {}), args.rate, args.seconds)),
                ("bare20", "bare FastAPI route, the 20-id answer's bytes", bare_proc.pid,
                 lambda: open_loop(bare_port, post("/bare_sized", {}), args.rate, args.seconds)),
                ("query1", "/query_result, 1 id", proc.pid,
                 lambda: open_loop(port, post("/query_result", {"task_id_list": ids[:1]}), args.rate, args.seconds)),
                ("query20", "/query_result, 20 ids", proc.pid,
                 lambda: open_loop(port, post("/query_result", {"task_id_list": ids}), args.rate, args.seconds))]
        for key, name, pid, make in rows:
            if only and key not in only:
                continue
            warm = {"bare": post("/bare", {}), "bare20": post("/bare_sized", {})}.get(
                key, post("/query_result", {"task_id_list": ids}))
            asyncio.run(open_loop(port if pid == proc.pid else bare_port, warm, 50, 1))  # warm up
            result, cpu = measured(pid, make())
            print(row(name, result, cpu), flush=True)
        if not only or "release" in only:
            release = post("/release_task", {"prompt": "load test", "audio_duration": 10})
            for clients in (1, 10, 50):
                result, cpu = measured(proc.pid, closed_loop(port, lambda: release, clients, args.seconds))
                print(row(f"/release_task, {clients} client(s)", result, cpu), flush=True)
    print(f"\nreproduce: .venv/bin/python bench/load.py --rate {args.rate:.0f} --seconds {args.seconds:.0f}"
          f"{' --busy-worker' if args.busy_worker else ''}")


if __name__ == "__main__":
    main()
