"""Soak: thousands of tasks submitted through the real API process, run by real workers; workers are
killed (-9) again and again, the API a few times, while hostile clients (chat bombs, /format_input
bursts, made-up tokens and X-Forwarded-For, a slow webhook receiver) do their worst and a prober reads
/health. Then nothing may be lost or duplicated, every hostile request has its expected answer (never
a 500) and /health answered within 1 s whenever the API was up. Behind the `soak` marker, never in
`make test` (tests/conftest.py skips it unless `-m soak`):

    ACESTEP_SOAK_TASKS=5000 .venv/bin/python -m pytest tests/test_soak.py -m soak -s -p no:cacheprovider

ACESTEP_SOAK_TASKS (5000), ACESTEP_SOAK_KILL_EVERY (a worker lives 1.0 s once up), ACESTEP_SOAK_API_KILLS (3).

Concurrent workers on one SQLite file are also in the fast suite (test_concurrent_workers_...).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from engine.request import GenerationRequest
from service.blob_keys import parse_output_key
from service.config import Settings
from service.embedded import make_embedded_backend
from service.ports import FAILED, SUCCEEDED
from service.records import QUEUED, RUNNING, TERMINAL
from service.submission import Upload, submit_task
from service.worker import Worker
from tests.fault_worker import FastEngine
from tests.live_server import REPO, poll_until
from tests.drip_receiver import DripReceiver
from tests.soak_clients import (ANSWERED_WITHIN, ApiProcess, HealthProber, LoadClient, Receiver, answer_status,
                                hostile_round, percentile)

TASKS = int(os.environ.get("ACESTEP_SOAK_TASKS", "5000"))
KILL_EVERY = float(os.environ.get("ACESTEP_SOAK_KILL_EVERY", "1.0"))
API_KILLS = int(os.environ.get("ACESTEP_SOAK_API_KILLS", "3"))


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
    lost = [t for t in ids if t not in records or records[t].status not in TERMINAL]
    duplicates = []
    for task_id, rec in records.items():
        attempts = {parse_output_key(k).name.split("-")[0] for k in rec.blob_keys if parse_output_key(k)}
        if rec.status == SUCCEEDED and not rec.request.analysis_only and (
                len(attempts) != 1 or len(rec.result.audios) != rec.request.batch_size):
            duplicates.append(task_id)
    return {"lost": lost, "duplicates": duplicates,
            "succeeded": sum(r.status == SUCCEEDED for r in records.values()),
            "failed": sum(r.status == FAILED for r in records.values()),
            "rerun": sum(r.attempt > 1 for r in records.values())}  # claimed again after a worker died


def test_concurrent_workers_on_one_sqlite_file_run_each_task_once(tmp_path):
    # one engine call per task (no batching), so calls count tasks
    settings = Settings(data_dir=str(tmp_path / "data"), visibility_timeout=30.0, batch_compatible_tasks=False)
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
    workers = [Worker(settings, make_embedded_backend(settings), engine) for _ in range(3)]
    threads = [threading.Thread(target=lambda w=w: [w.run_once(0.05) for _ in range(40)]) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcome = _check_nothing_lost_or_duplicated(backend, ids)
    assert outcome["lost"] == [] and outcome["duplicates"] == [] and outcome["succeeded"] == 40
    assert sorted(calls) == sorted(str([i]) for i in range(40))  # each ran exactly once


# What each hostile request may be answered (issue 21): a refusal that says why, or the work done;
# never a 500 and never a dropped connection while the API is up.
OVER_LIMIT = {"400"}
EXPECTED = {
    "chat: <prompt> x 32000 (over)": OVER_LIMIT, "chat: a part over the limit": OVER_LIMIT,
    # parsed (linearly), then refused: untagged text is an LM sample query, at most 4096 characters
    "chat: <prompt> x 4096 (at the limit)": {"400"}, "chat: unclosed <lyrics> at the limit": {"400"},
    "chat: 16 parts at the limit": {"400"},
    "chat: caption and lyrics of tags at their limits": {"200"},  # a song: the chat answers when it is done
    "format burst": {"200", "429", "504"},  # answered, over the caller's burst or limits, or its wait ran out
    "made-up Bearer token": {"200", "429"}, "made-up body ai_token": {"200", "429"},
    "made-up X-Forwarded-For": {"200", "429"},
}
SLOW_HOOK_EVERY, FAST_HOOK_EVERY, COVER_EVERY = 50, 25, 20
HOSTILE_PAUSE = 2.0  # s between hostile rounds (each round also adds ~120 tasks of its own)


def _all_records(backend, data: str) -> dict:
    """Every task the store holds, whoever submitted it (the hostile clients' too)."""
    with contextlib.closing(sqlite3.connect(f"file:{os.path.join(data, 'acestep.db')}?mode=ro", uri=True)) as db:
        ids = [row[0] for row in db.execute("SELECT task_id FROM tasks")]
    records: dict = {}
    for k in range(0, len(ids), 500):
        records.update(backend.store.get_many(ids[k:k + 500]))
    return records


class _Chaos(threading.Thread):
    """A background loop whose exception fails the test instead of vanishing with the thread."""

    def __init__(self, step, done: threading.Event):
        super().__init__(daemon=True)
        self.step, self.done, self.error = step, done, None

    def run(self):
        try:
            while not self.done.is_set():
                self.step()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_kills_and_hostile_clients_lose_and_duplicate_nothing(tmp_path):
    data = str(tmp_path / "data")
    os.makedirs(data)
    # The workers serve the model "fast"; kills must not dead-letter; loopback webhook receivers.
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "ACESTEP_CONFIG_PATH": "fast",
           "ACESTEP_MAX_RECEIVES": "1000", "ACESTEP_WEBHOOK_ALLOW_PRIVATE": "true", "ACESTEP_MIN_FREE_MB": "0"}
    settings = Settings(data_dir=data, visibility_timeout=2.0, max_receives=1000)
    backend = make_embedded_backend(settings)
    rate = Settings().rate_limit_rps  # the default the API runs with: rate and caller limits are not raised

    # Workers are forked from a server that has imported everything once: a restart costs a fork,
    # not a Python start-up (seconds, tens of seconds on a loaded machine), so the run is bounded.
    server = subprocess.Popen([sys.executable, "-m", "tests.fault_worker", "--fork-server", data, "2.0", "--format"],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    assert server.stdin is not None and server.stdout is not None

    def start() -> int:
        server.stdin.write("fork\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        poll_until(f"worker {pid} to die", lambda: not _alive(pid), 30, interval=0.01)

    def ready(pid: int) -> bool:
        return os.path.exists(os.path.join(data, f"ready-{pid}"))

    t0 = time.monotonic()
    procs = [start(), start()]
    api = ApiProcess(data, env)
    api.start()
    fast_hook, slow_hook = Receiver(), DripReceiver()
    load = LoadClient(api)
    inputs = hostile_inputs()
    rng, api_rng = random.Random(11), random.Random(21)
    accepted: dict[int, str] = {}
    refused: dict[int, tuple[str, str]] = {}
    covers: Counter = Counter()
    hostile: list[tuple[str, str]] = []
    rotations: list[dict] = []
    restarts: list[float] = []
    worker_kills = [0]
    progress = [0]
    workers_done, hostile_done = threading.Event(), threading.Event()

    def kill_a_worker():  # kill -9 a worker KILL_EVERY s after it is up (imported, serving), then start a new one
        if workers_done.wait(0.2):
            return
        victim = rng.randrange(len(procs))
        if not ready(procs[victim]) or workers_done.wait(KILL_EVERY):
            return
        kill(procs[victim])
        procs[victim] = start()
        worker_kills[0] += 1

    def hostile_then_maybe_kill_the_api():  # one thread: no hostile request is in flight when the API dies
        answers, counts = hostile_round(api, len(rotations))
        hostile.extend(answers)
        rotations.append(counts)
        if len(restarts) < API_KILLS and progress[0] >= (len(restarts) + 1) * TASKS / (API_KILLS + 1):
            if load.in_flight.wait(5):  # with a submit on the wire: the case its Idempotency-Key is for
                time.sleep(api_rng.uniform(0, 0.004))
            restarts.append(api.restart())
        hostile_done.wait(HOSTILE_PAUSE)

    chaos = [_Chaos(kill_a_worker, workers_done), _Chaos(hostile_then_maybe_kill_the_api, hostile_done)]
    with HealthProber(api) as prober:
        for thread in chaos:
            thread.start()
        try:
            for i in range(TASKS):
                fields: dict = {"prompt": f"soak-load {i}", "audio_duration": 10, "batch_size": 1 + i % 3}
                if i % SLOW_HOOK_EVERY == 11:
                    fields["webhook_url"] = slow_hook.url
                elif i % FAST_HOOK_EVERY == 3:
                    fields["webhook_url"] = fast_hook.url
                if i % COVER_EVERY == 7:  # a cover task with a hostile (or fine) source, uploaded with it
                    name, audio = inputs[(i // COVER_EVERY) % len(inputs)]
                    form = {**{k: str(v) for k, v in fields.items()}, "task_type": "cover"}
                    r = load.submit(f"soak-{i}", data=form, files={"src_audio": ("in.wav", audio, "audio/wav")})
                    covers[(name, answer_status(r))] += 1
                else:
                    name, r = "text", load.submit(f"soak-{i}", json=fields)
                if r.status_code == 200:
                    accepted[i] = r.json()["data"]["task_id"]
                else:
                    refused[i] = (name, f"{r.status_code} {r.text[:200]}")
                progress[0] = i + 1
            submitted = time.monotonic()
            poll_until("the API kills", lambda: len(restarts) >= API_KILLS or chaos[1].error, 600, interval=0.5)
            hostile_done.set()
            chaos[1].join(600)

            def drained():
                counts = backend.store.counts()
                return counts.get(QUEUED, 0) + counts.get(RUNNING, 0) == 0

            poll_until("the soak to drain", drained, 1800, interval=0.5)
            drained_at = time.monotonic()
            # Webhooks are delivered by the workers (still being killed): each fast receiver's task must
            # arrive, however many deliveries the slow receiver holds up meanwhile.
            hooked = {accepted[i] for i in accepted if i % FAST_HOOK_EVERY == 3 and i % SLOW_HOOK_EVERY != 11}
            with contextlib.suppress(AssertionError):  # asserted below, with the figures printed first
                poll_until("the webhooks", lambda: hooked <= fast_hook.task_ids(), 300, interval=0.5)
            webhook_wait = time.monotonic() - drained_at
        finally:
            prober.stop()  # before the API stops
            hostile_done.set()
            workers_done.set()
            for thread in chaos:
                thread.join(600)
            for pid in procs:
                kill(pid)
            server.stdin.close()  # the server ends (its children would die with it)
            server.wait(30)
            api.stop()
            fast_hook.close()
            slow_hook.close()
    records = _all_records(backend, data)

    for thread in chaos:
        assert thread.error is None, f"{thread.step.__name__}: {thread.error!r}"
    outcome = _check_nothing_lost_or_duplicated(backend, list(records))
    by_prompt = Counter(r.request.prompt for r in records.values() if r.request.prompt.startswith("soak-load "))
    load_records = {r.request.prompt: r.task_id for r in records.values() if r.request.prompt.startswith("soak-load ")}
    load_lost = [i for i, task_id in accepted.items() if load_records.get(f"soak-load {i}") != task_id]
    load_twice = [p for p, n in by_prompt.items() if n > 1]
    answers = Counter(hostile)
    unexpected = {k: n for k, n in answers.items() if k[1] not in EXPECTED.get(k[0], ())}
    over_rate = [c for c in rotations for who in ("tokens", "forwarded")
                 if c[f"{who}_accepted"] > 2 * rate + rate * c[f"{who}_elapsed"] + 1]
    up, down = prober.split()
    latencies = [p.seconds for p in up]
    failed = [r for r in records.values() if r.status == FAILED]
    summary = {
        "tasks_submitted": TASKS, "accepted": len(accepted), "refused_at_submit": len(refused),
        "tasks_in_store": len(records), "by_status": dict(Counter(r.status for r in records.values())),
        "lost": len(outcome["lost"]) + len(load_lost), "duplicated": len(outcome["duplicates"]) + len(load_twice),
        "worker_kills": worker_kills[0], "rerun_after_kill": outcome["rerun"],
        "api_kills": len(restarts), "api_down_s": [round(s, 1) for s in restarts],
        "load_answers": dict(load.statuses), "load_connection_errors": load.connection_errors,
        "load_submits_resent_after_api_kill": load.resent_after_a_kill,
        "cover_sources": {f"{n} -> {s}": c for (n, s), c in sorted(covers.items())},
        "hostile_rounds": len(rotations), "hostile": {f"{k} -> {s}": n for (k, s), n in sorted(answers.items())},
        "rotation_accepted_max": max((max(c["tokens_accepted"], c["forwarded_accepted"]) for c in rotations),
                                     default=0),
        "webhooks_fast_tasks": len(hooked), "webhooks_fast_delivered": len(hooked & fast_hook.task_ids()),
        "webhook_posts": len(fast_hook.deliveries), "webhook_wait_s": round(webhook_wait, 1),
        "slow_receiver_connections": slow_hook.connections,
        "health_probes": len(up), "health_probes_during_api_restarts": len(down),
        "health_p50_s": round(percentile(latencies, 0.5), 4), "health_p99_s": round(percentile(latencies, 0.99), 4),
        "health_max_s": round(max(latencies, default=float("nan")), 4),
        "health_statuses": dict(Counter(p.status for p in up)),
        "submit_s": round(submitted - t0), "drain_s": round(drained_at - submitted),
        "total_s": round(time.monotonic() - t0),
    }
    print("\nSOAK " + json.dumps(summary))
    assert outcome["lost"] == [] and load_lost == [], (outcome["lost"][:5], load_lost[:5])
    assert outcome["duplicates"] == [] and load_twice == [], (outcome["duplicates"][:5], load_twice[:5])
    assert all(name != "text" for name, _ in refused.values()), list(refused.items())[:5]  # only bad sources
    assert {s for _, s in covers} <= {"200", "400"}, covers  # a source is taken, or refused saying why
    assert all(r.request.task_type == "cover" for r in failed), [r.error for r in failed][:5]  # hostile inputs only
    assert not unexpected, unexpected
    assert 500 not in load.statuses and not any(s.startswith("5") and s != "504" for _, s in hostile)
    assert not over_rate, over_rate  # made-up identities bought no extra requests
    assert all(p.status in (200, 503) for p in up), Counter(p.status for p in up)  # answered whenever it was up
    assert max(latencies) < ANSWERED_WITHIN, sorted(latencies)[-5:]
    assert hooked <= fast_hook.task_ids(), len(hooked - fast_hook.task_ids())
