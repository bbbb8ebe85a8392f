"""acestep_client against an upstream ACE-Step API server's shapes (upstream-api.md §1-2), served by an
httpx transport that answers as upstream does: string `result`, "N/A" metas, one shared `seed_value`,
failures with no reason, unknown ids "in progress" forever, the OpenRouter /v1/models list, no cancel
route, header-only auth on /v1/audio. Plus the client's waiting rules (backoff, timeout, cancellation)."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from acestep_client import (ACEStepClient, APIError, AsyncACEStepClient, AuthError, NotSupported, TaskFailed, TaskState,
                            WaitCancelled, WaitTimeout)
from acestep_client.types import TaskStatus

KEY = "k"
AUDIO = b"ID3fake-mp3-bytes"
FILE = "/v1/audio?path=%2Fproject%2F.cache%2Facestep%2Ftmp%2Fapi_audio%2F1f0e.mp3"


def _wrap(data):
    return {"data": data, "code": 200, "error": None, "timestamp": 1770530000000, "extra": None}


def _entry(task_id, status, items):
    return {"task_id": task_id, "status": status, "result": json.dumps(items), "progress_text": "log line"}


def _running(stage, progress):
    return [{"file": "", "wave": "", "status": 0, "create_time": 1, "env": "development", "progress": progress,
             "stage": stage}]


SUCCEEDED = [{"file": FILE.replace("1f0e", name), "wave": "", "status": 1, "create_time": 1, "env": "development",
              "prompt": "p", "lyrics": "", "metas": {"bpm": "N/A", "duration": 30, "genres": "N/A",
                                                     "keyscale": "G major", "timesignature": "4"},
              "generation_info": "info", "seed_value": "11,22", "lm_model": "acestep-5Hz-lm-0.6B",
              "dit_model": "acestep-v15-turbo", "progress": 1.0, "stage": "succeeded"} for name in ("a1", "b2")]


class Upstream:
    """The upstream server's answers; `script` is what successive polls of task "t1" return."""

    def __init__(self):
        self.polls = 0
        self.requests: list[httpx.Request] = []
        self.script = [(0, [{"file": "", "wave": "", "status": 0, "create_time": 1, "env": "development",
                             "prompt": "", "lyrics": "", "metas": {}, "progress": 0.0, "stage": "queued",
                             "error": None}]),
                       (0, _running("Phase 1: Generating CoT metadata (once for all items)...", 0.1)),
                       (0, _running("Generating music (batch size: 2)...", 0.6)),
                       (1, SUCCEEDED)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        authed = request.headers.get("authorization") == f"Bearer {KEY}"
        if path == "/release_task":
            return httpx.Response(200, json=_wrap({"task_id": "t1", "status": "queued", "queue_position": 1}))
        if path == "/query_result":
            out = []
            for task_id in json.loads(request.content)["task_id_list"]:
                if task_id == "t1":
                    status, items = self.script[min(self.polls, len(self.script) - 1)]
                    self.polls += 1
                    out.append(_entry(task_id, status, items))
                elif task_id == "broken":
                    out.append(_entry(task_id, 2, [{"file": "", "wave": "", "status": 2, "create_time": 1,
                                                    "env": "development", "progress": 0.0, "stage": "failed"}]))
                else:  # unknown ids are in progress forever upstream
                    out.append({"task_id": task_id, "status": 0, "result": "[]"})
            return httpx.Response(200, json=_wrap(out))
        if path == "/v1/audio":
            if not authed:
                return httpx.Response(401, json={"detail": "Missing Authorization header"})
            return httpx.Response(200, content=AUDIO, headers={"content-type": "audio/mpeg"})
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "acestep/acestep-v15-turbo", "name": "ACE-Step acestep-v15-turbo"}]})
        if path == "/format_input":
            return httpx.Response(200, json={"data": None, "code": 500, "error": "LLM not initialized",
                                             "timestamp": 1, "extra": None})
        return httpx.Response(404, json={"detail": "Not Found"})


@pytest.fixture
def upstream():
    return Upstream()


@pytest.fixture
def client(upstream):
    http = httpx.Client(transport=httpx.MockTransport(upstream))
    with ACEStepClient("http://upstream:8001", KEY, http=http) as c:
        yield c


def test_generate_follows_queue_then_stages_and_downloads_with_the_key(client, upstream, tmp_path):
    seen: list[TaskStatus] = []
    paths = client.generate_and_download("lofi", str(tmp_path), audio_duration=30, on_update=seen.append,
                                         timeout=10)
    assert [s.state for s in seen] == [TaskState.QUEUED, TaskState.RUNNING, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert seen[1].stage.startswith("Phase 1") and seen[2].progress == 0.6
    assert [p.rsplit("/", 1)[1] for p in paths] == ["t1_0.mp3", "t1_1.mp3"]
    assert all(open(p, "rb").read() == AUDIO for p in paths)
    done = seen[-1]
    assert [a.seed for a in done.audios] == [11, 22]  # upstream's shared "11,22", one per item
    assert done.audios[0].metas.bpm is None and done.audios[0].metas.keyscale == "G major"
    assert done.audios[0].metas.duration == 30.0
    submit = upstream.requests[0]
    assert json.loads(submit.content) == {"prompt": "lofi", "lyrics": "", "audio_duration": 30}
    assert submit.headers["authorization"] == f"Bearer {KEY}" and submit.headers["idempotency-key"]


def test_a_failure_without_a_reason_still_says_it_failed(client):
    status = client.status("broken")
    assert status.state is TaskState.FAILED and "no reason" in (status.error or "")
    with pytest.raises(TaskFailed, match="broken failed"):
        client.wait("broken", timeout=5)


def test_an_id_upstream_never_finishes_times_out_with_the_last_status(client, upstream):
    with pytest.raises(WaitTimeout) as caught:
        client.wait("unknown-id", timeout=0.3, poll_interval=0.01, max_interval=0.05)
    assert caught.value.task_id == "unknown-id"
    polls = [r for r in upstream.requests if r.url.path == "/query_result"]
    assert 3 <= len(polls) <= 30  # backed off, and did poll more than once


def test_backoff_grows_while_nothing_changes_and_resets_when_the_task_moves():
    from acestep_client.waiting import Backoff

    b = Backoff(timeout=None, initial=1.0, maximum=3.0, factor=2.0)
    assert [b.next_delay("q") for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert b.next_delay("running") == 1.0


def test_the_wait_steps_through_transient_errors_to_its_deadline_and_lets_other_errors_out():
    """The shared wait logic on its own, on a fake clock: the branches the client tests above do not reach."""
    from acestep_client import ServerUnreachable
    from acestep_client.waiting import Waiting

    now = [0.0]
    running = TaskStatus.parse(_entry("t1", 0, _running("VAE decode", 0.5)))
    waiting = Waiting("t1", timeout=10, poll_interval=1.0, max_interval=4.0, clock=lambda: now[0])
    assert waiting.step(running) == 1.0
    busy = APIError(503, "restarting")
    assert [waiting.step(busy), waiting.step(ServerUnreachable("blink")), waiting.step(busy)] == [1.0, 1.5, 2.25]
    now[0] = 9.5
    assert waiting.step(running) == 0.5  # never sleeps past the deadline
    now[0] = 10.0
    with pytest.raises(WaitTimeout):
        waiting.step(running)
    with pytest.raises(AuthError):  # not worth retrying: out at once, deadline or not
        Waiting("t1", timeout=None).step(AuthError(401, "bad key"))
    failed = TaskStatus.parse(_entry("t1", 2, _running("failed", 0.5)) | {"error": "out of memory"})
    assert Waiting("t1", timeout=None, raise_on_failure=False).step(failed) is failed
    with pytest.raises(TaskFailed, match="out of memory"):
        Waiting("t1", timeout=None).step(failed)


def test_the_cancel_event_stops_a_wait_promptly(client):
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(WaitCancelled):
        client.wait("unknown-id", timeout=30, poll_interval=5, cancel=stop)


def test_cancel_on_a_server_without_the_route_is_not_supported(client):
    with pytest.raises(NotSupported) as caught:
        client.cancel("t1")
    assert caught.value.status_code == 404


def test_models_read_the_openrouter_list_upstream_serves(client):
    listing = client.models()
    assert [m.name for m in listing.models] == ["acestep/acestep-v15-turbo"]
    assert listing.default_model == "acestep/acestep-v15-turbo"


def test_download_without_the_key_is_an_auth_error(upstream, tmp_path):
    http = httpx.Client(transport=httpx.MockTransport(upstream))
    with ACEStepClient("http://upstream:8001", None, http=http) as anonymous:
        status = TaskStatus.parse(_entry("t1", 1, SUCCEEDED))
        with pytest.raises(AuthError, match="Missing Authorization header"):
            anonymous.download(status.audios[0], str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_a_soft_failure_envelope_is_an_error(upstream):
    """Upstream's /format_input answers HTTP 200 with `code: 500` when it fails."""
    from acestep_client.protocol import Call, read

    response = upstream(httpx.Request("POST", "http://upstream:8001/format_input"))
    with pytest.raises(APIError, match="LLM not initialized"):
        read(response, Call("POST", "/format_input"))


def test_async_client_generates_and_cancellation_stops_its_wait(upstream, tmp_path):
    async def scenario():
        http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        async with AsyncACEStepClient("http://upstream:8001", KEY, http=http) as client:
            paths = await client.generate_and_download("lofi", str(tmp_path), timeout=10)
            waiting = asyncio.ensure_future(client.wait("unknown-id", timeout=30, poll_interval=5))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            return paths

    paths = asyncio.run(scenario())
    assert len(paths) == 2 and all(open(p, "rb").read() == AUDIO for p in paths)


def test_the_client_package_imports_neither_torch_nor_the_server():
    """acestep_client ships to machines without the service: httpx, tqdm and the stdlib only."""
    import subprocess
    import sys
    from pathlib import Path

    import grimp

    ROOT = Path(__file__).resolve().parents[1]
    # Every import statement of the package (also inside functions); what lies outside it, by top-level name.
    graph = grimp.build_graph("acestep_client", include_external_packages=True)
    allowed = {"httpx", "tqdm", "acestep_client"} | set(sys.stdlib_module_names)
    outside = {m for m in graph.modules if m.split(".", 1)[0] != "acestep_client"}
    assert "httpx" in outside  # the graph does hold the package's external imports
    bad = [f"{importer} imports {m}" for m in sorted(outside - allowed)
           for importer in graph.find_modules_that_directly_import(m)]
    assert not bad, bad
    probe = ("import sys, acestep_client, acestep_client.cli; "
             "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'numpy', 'service', 'handlers') "
             "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=str(ROOT), check=True)
    assert run.stdout.strip() == "[]"


def test_a_cancelled_task_is_told_apart_from_a_failed_one():
    entry = _entry("c1", 2, [{"file": "", "status": 2, "progress": 0.3, "stage": "cancelled",
                              "error": "cancelled by the client"}]) | {"error": "cancelled by the client"}
    status = TaskStatus.parse(entry)
    assert status.state is TaskState.CANCELLED and status.finished and status.error == "cancelled by the client"


def test_downloads_are_named_by_the_file_type():  # wav32 is 32-bit float WAV: a .wav file
    items = [{"file": f"/v1/audio?path=outputs%2Ft%2F1-{i}.{ext}", "status": 1, "format": fmt}
             for i, (fmt, ext) in enumerate([("wav32", "wav"), ("opus", "opus"), ("aac", "aac")])]
    status = TaskStatus.parse(_entry("t", 1, items))
    assert [a.extension for a in status.audios] == ["wav", "opus", "aac"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_on_update_hears_of_changes_not_of_every_poll(upstream, kind):
    queued = upstream.script[0]
    upstream.script = [queued, queued, queued, (0, _running("diffusion step 1/8", 0.1)),
                       (0, _running("diffusion step 1/8", 0.101)), (0, _running("VAE decode", 0.9)),
                       (0, _running("VAE decode", 0.9)), (1, SUCCEEDED)]
    seen: list[TaskStatus] = []
    if kind == "sync":
        with ACEStepClient("http://upstream:8001", KEY, http=httpx.Client(transport=httpx.MockTransport(upstream))) as c:
            done = c.wait("t1", timeout=10, on_update=seen.append, poll_interval=0.001, max_interval=0.001)
    else:
        async def run():
            http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
            async with AsyncACEStepClient("http://upstream:8001", KEY, http=http) as c:
                return await c.wait("t1", timeout=10, on_update=seen.append, poll_interval=0.001,
                                    max_interval=0.001)
        done = asyncio.run(run())
    assert upstream.polls == 8
    assert [(s.state, s.stage) for s in seen] == [(TaskState.QUEUED, "queued"),
                                                  (TaskState.RUNNING, "diffusion step 1/8"),
                                                  (TaskState.RUNNING, "VAE decode"),
                                                  (TaskState.SUCCEEDED, "succeeded")]
    assert seen[-1] is done
