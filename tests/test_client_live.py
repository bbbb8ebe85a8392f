"""acestep_client and the `acestep` CLI against the real service (tests/demo_servers.py): with and
without an API key, generate -> progress -> download, statuses, models, errors and exit codes."""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import pytest
import soundfile as sf

from acestep_client import (ACEStepClient, APIError, AsyncACEStepClient, AuthError, ServerUnreachable, TaskFailed,
                            TaskState, TaskStatus)
from tests.demo_servers import API_KEY, QUICK
from tests.live_server import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed(keyed_server):
    return keyed_server


def acestep(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The console script as a shell runs it (python -m keeps it independent of PATH)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_API_")}
    full_env.update({"PYTHONPATH": REPO, **(env or {})})
    return subprocess.run([sys.executable, "-m", "acestep_client.cli", *args], capture_output=True, text=True,
                          env=full_env, input=stdin, timeout=120)


def test_sync_client_generates_with_the_key_and_reports_seeds_and_metas(keyed, tmp_path):
    seen: list[TaskStatus] = []
    with ACEStepClient(keyed.base_url, API_KEY) as client:
        task = client.submit("calm piano", "[verse]\nla la", **(QUICK | {"batch_size": 2}), seed="5,6",
                             audio_format="wav", bpm=90)
        done = client.wait(task.task_id, timeout=120, on_update=seen.append, poll_interval=0.1)
        paths = client.download_all(done, str(tmp_path))
    assert seen[-1] is done and done.state is TaskState.SUCCEEDED
    assert [a.seed for a in done.audios] == [5, 6] and all(a.metas.bpm == 90 for a in done.audios)
    assert [os.path.basename(p) for p in paths] == [f"{task.task_id}_0.wav", f"{task.task_id}_1.wav"]
    audio, rate = sf.read(paths[0])
    assert rate == 48000 and len(audio) >= 9 * rate


def test_async_client_generates_and_lists_models(keyed, tmp_path):
    async def run():
        async with AsyncACEStepClient(keyed.base_url, API_KEY) as client:
            models = await client.models()
            paths = await client.generate_and_download("drums", str(tmp_path / "out"), **QUICK,
                                                       audio_format="flac", timeout=120)
            return models, paths

    models, paths = asyncio.run(run())
    assert models.default_model == "acestep-v15-turbo" and models.models[0].random_weights is True
    assert len(paths) == 1 and paths[0].endswith("_0.flac")
    assert sf.info(paths[0]).samplerate == 48000


def test_errors_are_typed_with_the_servers_words(keyed):
    with ACEStepClient(keyed.base_url, "wrong") as client, pytest.raises(AuthError, match="Invalid API key"):
        client.models()
    with ACEStepClient(keyed.base_url, API_KEY) as client:
        with pytest.raises(APIError) as bad:
            client.submit("x", bpm=5)
        assert bad.value.status_code == 400 and "bpm" in str(bad.value)
        unknown = client.status("no-such-task")
        assert unknown.state is TaskState.FAILED and unknown.error == "task not found"
    with ACEStepClient(f"http://127.0.0.1:{free_port()}") as nowhere, pytest.raises(ServerUnreachable):
        nowhere.models()


def test_cli_generate_shows_progress_writes_files_and_exits_0(keyed, tmp_path):
    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text("[chorus]\nhello", encoding="utf-8")
    out = tmp_path / "out"
    run = acestep("generate", "synth pop", "--lyrics", str(lyrics), "--duration", "10", "--batch-size", "1",
                  "--steps", "2", "--format", "wav", "--seed", "42", "-o", str(out),
                  env={"ACESTEP_API_URL": keyed.base_url, "ACESTEP_API_KEY": API_KEY})
    assert run.returncode == 0, run.stderr
    paths = run.stdout.split()
    assert len(paths) == 1 and os.path.dirname(paths[0]) == str(out)
    assert sf.info(paths[0]).samplerate == 48000
    assert "queued" in run.stderr and "100%" in run.stderr  # not a terminal: one line per change
    task_id = os.path.basename(paths[0]).rsplit("_", 1)[0]

    status = acestep("--api-url", keyed.base_url, "--api-key", API_KEY, "status", task_id, "--json")
    assert status.returncode == 0, status.stderr
    described = json.loads(status.stdout)
    assert described["state"] == "succeeded" and described["audios"][0]["seed"] == 42


def test_cli_exit_codes_a_script_can_branch_on(keyed, tmp_path):
    base = ["--api-url", keyed.base_url]
    assert acestep(*base, "models").returncode == 3  # no key
    models = acestep(*base, "--api-key", API_KEY, "models")
    assert models.returncode == 0 and "acestep-v15-turbo  (default, random weights)" in models.stdout
    bad = acestep(*base, "--api-key", API_KEY, "generate", "x", "--bpm", "5", "-o", str(tmp_path))
    assert bad.returncode == 4 and "bpm" in bad.stderr
    missing = acestep(*base, "--api-key", API_KEY, "status", "no-such-task")
    assert missing.returncode == 1 and "task not found" in missing.stdout
    assert acestep("--api-url", f"http://127.0.0.1:{free_port()}", "models").returncode == 5
    slow = acestep(*base, "--api-key", API_KEY, "generate", "x", "--duration", "10", "--steps", "1",
                   "--timeout", "0.01", "-o", str(tmp_path))
    assert slow.returncode == 6 and "acestep status" in slow.stderr
    left = slow.stderr.split("acestep status ", 1)[1].split("`", 1)[0]
    assert acestep(*base, "--api-key", API_KEY, "cancel", left).returncode == 0  # the server need not finish it
    assert acestep(*base, "generate", "x", "--src-audio", str(tmp_path / "none.wav")).returncode == 2


def test_cli_cancel_stops_a_queued_task_and_status_says_so(keyed):
    with ACEStepClient(keyed.base_url, API_KEY) as client:
        busy = client.submit("long", audio_duration=60, batch_size=2, inference_steps=8)  # holds the worker
        target = client.submit("x", **QUICK)
        assert client.status(target.task_id).state is TaskState.QUEUED
        base = ["--api-url", keyed.base_url, "--api-key", API_KEY]
        run = acestep(*base, "cancel", target.task_id)
        assert run.returncode == 0 and run.stdout.strip() == f"task {target.task_id}: cancelled", run.stderr
        status = acestep(*base, "status", target.task_id)
        assert status.returncode == 1 and status.stdout.strip() == "cancelled: cancelled by the client"
        with pytest.raises(TaskFailed, match="cancelled by the client"):
            client.wait(target.task_id, timeout=10)
        client.cancel(busy.task_id)  # frees the worker for the next test
        assert client.wait(busy.task_id, timeout=60, raise_on_failure=False).state is TaskState.CANCELLED
        again = acestep(*base, "cancel", busy.task_id)
        assert again.returncode == 0 and again.stdout.strip() == f"task {busy.task_id}: already cancelled"
