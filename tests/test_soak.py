"""Soak: thousands of tasks through real workers that are killed (-9) again and again, with hostile
inputs mixed in; then nothing may be lost or duplicated. Behind the `soak` marker, not in `make test`:

    SOAK_TASKS=5000 SOAK_KILL_EVERY=0.5 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_soak.py -m soak -s

Concurrent workers on one SQLite file are also in the fast suite (test_concurrent_workers_...).
"""
from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from engine.request import GenerationRequest
from service.blob_keys import parse_output_key
from service.config import Settings
from service.embedded import make_embedded_backend
from service.ports import FAILED, SUCCEEDED
from service.submission import Upload, submit_task
from service.worker import Worker
from tests.fault_worker import FastEngine
from tests.live_server import REPO, poll_until

TASKS = int(os.environ.get("SOAK_TASKS", "5000"))
KILL_EVERY = float(os.environ.get("SOAK_KILL_EVERY", "1.0"))


def _wav(data: np.ndarray, sr: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def hostile_inputs() -> list[tuple[str, bytes]]:
    nan = np.zeros((4800, 2), dtype="float32")
    nan[10, 0] = np.nan
    return [("nan", _wav(nan, 48000)), ("odd-rate", _wav(np.zeros(220, dtype="float32"), 44101, "PCM_16")),
            ("low-rate", _wav(np.zeros(4000, dtype="float32"), 4001, "PCM_16")),
            ("garbage", b"RIFF\x00\x00garbage" * 10), ("empty-ish", b"\x00"),
            ("fine", _wav(np.zeros((4800, 2), dtype="float32"), 48000))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _check_nothing_lost_or_duplicated(backend, ids: list[str]) -> dict:
    records = backend.store.get_many(ids)
    lost = [t for t in ids if t not in records or records[t].status not in (SUCCEEDED, FAILED)]
    duplicates = []
    for task_id, rec in records.items():
        attempts = {parse_output_key(k).name.split("-")[0] for k in rec.blob_keys if parse_output_key(k)}
        if rec.status == SUCCEEDED and (len(attempts) != 1 or len(rec.result.audios) != rec.request.batch_size):
            duplicates.append(task_id)
    return {"lost": lost, "duplicates": duplicates,
            "succeeded": sum(r.status == SUCCEEDED for r in records.values()),
            "failed": sum(r.status == FAILED for r in records.values()),
            "rerun": sum(r.attempt > 1 for r in records.values())}  # claimed again after a worker died


def test_concurrent_workers_on_one_sqlite_file_run_each_task_once(tmp_path):
    settings = Settings(data_dir=str(tmp_path / "data"), visibility_timeout=30.0)
    backend = make_embedded_backend(settings)
    ids = [submit_task(backend, GenerationRequest(audio_duration=10, seeds=[i]), 1000)[0]
           for i in range(40)]
    engine = FastEngine()
    calls: list[str] = []
    original = engine.generate

    def counting(request, **kw):
        calls.append(str(request.seeds))
        return original(request, **kw)

    engine.generate = counting  # type: ignore[method-assign]
    settings.batch_compatible_tasks = False  # one engine call per task, so calls count tasks
    workers = [Worker(settings, make_embedded_backend(settings), engine) for _ in range(3)]
    threads = [threading.Thread(target=lambda w=w: [w.run_once(0.05) for _ in range(40)]) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcome = _check_nothing_lost_or_duplicated(backend, ids)
    assert outcome["lost"] == [] and outcome["duplicates"] == [] and outcome["succeeded"] == 40
    assert sorted(calls) == sorted(str([i]) for i in range(40))  # each ran exactly once


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_kills_and_hostile_inputs_lose_and_duplicate_nothing(tmp_path):
    data = str(tmp_path / "data")
    settings = Settings(data_dir=data, visibility_timeout=2.0, max_receives=1000)  # kills must not dead-letter
    backend = make_embedded_backend(settings)
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}

    # Workers are forked from a server that has imported everything once: a restart costs a fork,
    # not a Python start-up (seconds, tens of seconds on a loaded machine), so the run is bounded.
    server = subprocess.Popen([sys.executable, "-m", "tests.fault_worker", "--fork-server", data, "2.0"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdin is not None and server.stdout is not None

    def start() -> int:
        server.stdin.write("fork\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        poll_until(f"worker {pid} to die", lambda: not _alive(pid), 30, interval=0.01)

    procs = [start(), start()]
    inputs = hostile_inputs()
    rng = random.Random(11)
    ids: list[str] = []
    kills, hostile = 0, 0
    done = threading.Event()

    def ready(pid: int) -> bool:
        return os.path.exists(os.path.join(data, f"ready-{pid}"))

    def killer():  # kill -9 a worker KILL_EVERY s after it is up (imported, serving), then start a new one
        nonlocal kills
        while not done.wait(0.2):
            victim = rng.randrange(len(procs))
            if not ready(procs[victim]) or done.wait(KILL_EVERY):
                continue
            kill(procs[victim])
            procs[victim] = start()
            kills += 1

    t0 = time.monotonic()
    chaos = threading.Thread(target=killer)
    chaos.start()
    try:
        for i in range(TASKS):
            if i % 20 == 7:  # a cover task with a hostile (or fine) source
                name, data_bytes = inputs[(i // 20) % len(inputs)]
                hostile += name != "fine"
                req = GenerationRequest(task_type="cover", audio_duration=10, src_audio_key="x").model_copy(
                    update={"src_audio_key": None})  # its upload's key is written at submission
                ids.append(submit_task(backend, req, 10 ** 6, uploads={"src_audio": Upload(data_bytes, "in.wav")})[0])
            else:
                ids.append(submit_task(backend, GenerationRequest(audio_duration=10, batch_size=1 + i % 3,
                                                                  seeds=[i]), 10 ** 6)[0])
        submitted = time.monotonic()

        def drained():
            counts = backend.store.counts()
            return counts["queued"] + counts["running"] == 0

        poll_until("the soak to drain", drained, 1200, interval=0.5)
    finally:
        done.set()
        chaos.join()
        for pid in procs:
            kill(pid)
        server.stdin.close()  # the server ends (its children would die with it)
        server.wait(30)
    outcome = _check_nothing_lost_or_duplicated(backend, ids)
    print(f"\nSOAK tasks={len(ids)} worker_kills={kills} hostile_inputs={hostile} succeeded={outcome['succeeded']} "
          f"failed={outcome['failed']} rerun_after_kill={outcome['rerun']} lost={len(outcome['lost'])} duplicates={len(outcome['duplicates'])} "
          f"submit_s={submitted - t0:.0f} total_s={time.monotonic() - t0:.0f}")
    assert outcome["lost"] == [] and outcome["duplicates"] == []
    failed = [r for r in backend.store.get_many(ids).values() if r.status == FAILED]
    assert all(r.request.task_type == "cover" for r in failed)  # only hostile inputs fail
