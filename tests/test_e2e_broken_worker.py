"""A worker that cannot load its model says so instead of crash-looping with tasks left queued.

The real service (`python -m entrypoints.api_server`, as `make run` starts it) with no weights, no
network and the demo fallback off: the worker stays up as a failed worker, /health names the
cause, and /release_task refuses new work with that cause.
"""
from __future__ import annotations

import time

import httpx

from tests.live_server import live_server


def test_worker_without_weights_reports_why_and_submits_are_refused(tmp_path):
    env = {"ACESTEP_DEMO_IF_MISSING": "false"}
    with live_server(str(tmp_path / "data"), str(tmp_path / "empty-checkpoints"), env=env) as server:
        deadline = time.monotonic() + 90
        data: dict = {}
        while time.monotonic() < deadline:
            data = httpx.get(server.base_url + "/health", timeout=5).json()["data"]
            if data["reasons"]:
                break
            time.sleep(0.3)
        assert data["status"] == "degraded", data
        assert "cannot serve" in data["reasons"][0] and "acestep-v15-turbo" in data["reasons"][0]
        pids = server.worker_pids()
        r = httpx.post(server.base_url + "/release_task", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 503 and "acestep-v15-turbo" in r.json()["detail"]
        time.sleep(2)
        assert pids and server.worker_pids() == pids  # the same process: no crash loop
        assert "could not load the engine" in server.log()
