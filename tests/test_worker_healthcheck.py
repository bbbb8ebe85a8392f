"""The container health check (`acestep-worker --healthcheck`) reads the heartbeat file the worker writes."""
from __future__ import annotations

import threading
import time

import pytest

from entrypoints.worker import main as worker_main
from service.observability.heartbeat import HeartbeatLoop
from service.observability.heartbeat_file import (
    STARTUP_LIMIT_SECONDS, starting_beat, unhealthy_reason, write_beat,
)
from service.records import WorkerHeartbeat
from tests.live_server import poll_until

NOW = 1_000_000.0


def _beat(**fields) -> WorkerHeartbeat:
    return WorkerHeartbeat(**{"worker_id": "w", "started_at": NOW - 600, "beat_at": NOW - 5, **fields})


@pytest.mark.parametrize("beat,healthy_part", [
    (_beat(state="idle"), None),
    (_beat(state="failed", error="no weights"), None),  # stays up to say why: not restarted
    (_beat(state="running", task_ids=["t1"], last_progress_at=NOW - 30), None),
    (_beat(state="idle", beat_at=NOW - 300), "last heartbeat 300 s ago"),
    (_beat(state="running", task_ids=["t1"], last_progress_at=NOW - 700), "no progress on t1 for 700 s"),
    (_beat(state="starting", started_at=NOW - 60, beat_at=NOW - 60), None),  # loading models
    (_beat(state="starting", started_at=NOW - STARTUP_LIMIT_SECONDS - 1, beat_at=NOW - STARTUP_LIMIT_SECONDS - 1),
     "still loading models"),
])
def test_health_follows_heartbeat_age_and_engine_progress(tmp_path, beat, healthy_part):
    path = str(tmp_path / "beat.json")
    write_beat(path, beat)
    reason = unhealthy_reason(path, stall_timeout=600, now=NOW)
    assert reason is None if healthy_part is None else healthy_part in reason


def test_missing_or_garbled_file_is_unhealthy(tmp_path):
    assert "no heartbeat file" in unhealthy_reason(str(tmp_path / "none.json"), 600)
    (tmp_path / "bad.json").write_text("{not json")
    assert "unreadable" in unhealthy_reason(str(tmp_path / "bad.json"), 600)


def test_cli_exit_status(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the worker loads ./.env into os.environ for good: none in a fresh folder
    path = str(tmp_path / "beat.json")
    write_beat(path, starting_beat("w"))
    with pytest.raises(SystemExit) as ok:
        worker_main(["--healthcheck", "--heartbeat-file", path])
    assert ok.value.code == 0 and "healthy" in capsys.readouterr().out
    write_beat(path, WorkerHeartbeat(worker_id="w", started_at=0, beat_at=time.time() - 3600))
    with pytest.raises(SystemExit) as bad:
        worker_main(["--healthcheck", "--heartbeat-file", path])
    assert bad.value.code == 1 and "last heartbeat" in capsys.readouterr().out


def test_heartbeat_loop_writes_the_file_even_when_the_store_fails(tmp_path):
    class DownStore:
        def record_heartbeat(self, beat):
            raise ConnectionError("store unreachable")

        def forget_heartbeat(self, worker_id):
            pass

    path = tmp_path / "beat.json"
    stop = threading.Event()
    beat = lambda: WorkerHeartbeat(worker_id="w", started_at=time.time(), beat_at=time.time(), state="idle")  # noqa: E731
    with HeartbeatLoop(DownStore(), beat, 0.05, stop, file=str(path)):  # type: ignore[arg-type]
        poll_until("the heartbeat file", path.exists, timeout=5)
        stop.set()
    assert unhealthy_reason(str(path), 600) is None
