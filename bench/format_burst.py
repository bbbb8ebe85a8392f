"""/health latency while a burst of /format_input calls waits for a worker (issue 21 item 3).

Starts the real API (`python -m entrypoints.api_server --workers 0`, embedded backend) from --repo, tells
its store that a worker runs the LM (so /format_input submits and waits) while none runs, sends --calls
concurrent /format_input calls, and times /health requests made one after another during the burst.
The request rate limit is off (ACESTEP_RATE_LIMIT_RPS=0) so the thread pool is what is measured.

    .venv/bin/python bench/format_burst.py [--repo DIR] [--calls 60] [--format-timeout 25]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "tests"))
from live_server import free_port, poll_until  # noqa: E402

MARK_LM = ("from service.config import Settings; from service.embedded import make_embedded_backend; "
           "from service.records import MODELS_META_KEY, ModelsMeta; import sys; "
           "b = make_embedded_backend(Settings(data_dir=sys.argv[1], checkpoint_dir=sys.argv[2])); "
           "b.store.put_meta(MODELS_META_KEY, ModelsMeta(lm_model='bench-lm').model_dump())")
COUNTS = ("from service.config import Settings; from service.embedded import make_embedded_backend; import sys; "
          "c = make_embedded_backend(Settings(data_dir=sys.argv[1], checkpoint_dir=sys.argv[2])).store.counts(); "
          "print(c['queued'], c.get('cancelled', 0))")


async def burst(base: str, calls: int, health_samples: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        started = time.perf_counter()
        tasks = [asyncio.create_task(client.post("/format_input", json={"prompt": f"song {i}"}))
                 for i in range(calls)]
        await asyncio.sleep(1.0)  # the burst is in: every call submitted or waiting
        health = []
        for _ in range(health_samples):
            t0 = time.perf_counter()
            r = await client.get("/health")
            health.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        waiting_after_health = sum(not t.done() for t in tasks)
        answers = await asyncio.gather(*tasks)
        return {"health_s": health, "format_calls_still_waiting_after_health": waiting_after_health,
                "statuses": dict(collections.Counter(r.status_code for r in answers)),
                "burst_wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default=HERE)
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--health-samples", type=int, default=5)
    p.add_argument("--format-timeout", type=float, default=25.0)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="format-burst-")
    data, ckpt = os.path.join(root, "data"), os.path.join(root, "ckpt")
    python = os.path.join(HERE, ".venv", "bin", "python")
    subprocess.run([python, "-c", MARK_LM, data, ckpt], cwd=args.repo, check=True)
    port = free_port()
    env = {**os.environ, "ACESTEP_RATE_LIMIT_RPS": "0", "ACESTEP_FORMAT_TIMEOUT": str(args.format_timeout),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": args.repo}
    with open(os.path.join(root, "api.log"), "w") as log:
        proc = subprocess.Popen([python, "-m", "entrypoints.api_server", "--workers", "0", "--port", str(port),
                                 "--data-dir", data, "--checkpoint-dir", ckpt], cwd=args.repo, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        poll_until("the API", lambda: _up(base), timeout=60)
        out = asyncio.run(burst(base, args.calls, args.health_samples))
    finally:
        proc.terminate()
        proc.wait(30)
    queued, cancelled = subprocess.run([python, "-c", COUNTS, data, ckpt], cwd=args.repo, check=True,
                                       capture_output=True, text=True).stdout.split()
    out |= {"tasks_left_queued": int(queued), "tasks_cancelled": int(cancelled)}
    h = out.pop("health_s")
    print({"repo": args.repo, "calls": args.calls, "health_median_s": round(statistics.median(h), 3),
           "health_max_s": round(max(h), 3), **out})


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
