"""POST /v1/init on one machine: the workers switch models at run time, between batches (service/model_set.py,
service/model_switch.py), on the in-process app and an embedded worker built the default way (bootstrap) with the
real engine on tiny random checkpoints. The AWS answer (409 naming the CDK context) is in tests/test_api_adapters.py.
"""
from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.engine_fixtures import BASE, TURBO, tiny_checkpoint_dir  # noqa: F401

pytestmark = pytest.mark.integration
BROKEN = "acestep-v15-broken"  # a folder that is there but does not load
TASK = {"prompt": "switch", "lyrics": "[instrumental]", "audio_duration": 10, "inference_steps": 2, "seed": 1,
        "audio_format": "wav"}


@pytest.fixture
def machine(tiny_checkpoint_dir, tmp_path):  # noqa: F811
    from entrypoints.bootstrap import build_app, build_backend, build_worker
    from service.config import Settings

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in (TURBO, BASE):
        os.symlink(tiny_checkpoint_dir / name, checkpoints / name)
    (checkpoints / BROKEN).mkdir()
    (checkpoints / BROKEN / "model_index.json").write_text("{not json")
    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(checkpoints), config_path=TURBO,
                        init_llm="false", allow_download=False, demo_if_missing=False, dtype="float32",
                        warmup="false", pipeline=False)
    backend = build_backend(settings)
    worker = build_worker(settings, backend=backend)
    worker.model_switch.check_seconds = 0  # look at every round, not once a second

    def beat():  # what the heartbeat thread of run_forever writes
        backend.store.record_heartbeat(worker.heartbeat())

    beat()
    return TestClient(build_app(settings, backend)), backend, worker, beat


def submit(client, **fields) -> str:
    r = client.post("/release_task", json={**TASK, **fields})
    assert r.status_code == 200, r.text
    return r.json()["data"]["task_id"]


def test_init_switches_the_workers_model_between_batches(machine):
    from service.records import FailureReason

    client, backend, worker, beat = machine
    queued = submit(client)  # stored as the default of its time: turbo
    r = client.post("/v1/init", json={"model": BASE, "wait_seconds": 0})
    assert r.status_code == 202, r.text
    assert (r.json()["data"]["status"], r.json()["data"]["model_switch"]["state"]) == ("loading", "loading")
    assert [m["name"] for m in client.get("/v1/models").json()["data"]["models"]] == [TURBO]  # not loaded yet

    assert worker.run_once(0.01)  # swaps first, then takes the queued task
    beat()
    record = backend.store.get(queued)
    assert (record.status, record.reason) == ("failed", FailureReason.MODEL_UNLOADED)
    assert f"model {TURBO} was unloaded by POST /v1/init" in record.error
    assert [m.name for m in worker.engine.models()] == [BASE]

    r = client.post("/v1/init", json={"model": BASE})  # asked again: done, in upstream's shape
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["message"], data["loaded_model"], data["slot"]) == ("Model initialization completed", BASE, 1)
    inventory = client.get("/v1/model_inventory").json()["data"]
    assert [(m["name"], m["is_default"], m["is_loaded"]) for m in inventory["models"]] == [(BASE, True, True)]
    assert inventory["model_switch"]["state"] == "loaded"

    task = submit(client)
    assert backend.store.get(task).request.model == BASE  # the new default at submit
    assert worker.run_once(0.01)
    record = backend.store.get(task)
    assert record.status == "succeeded", record.error
    assert submit(client, model=BASE) and client.post("/release_task", json={**TASK, "model": TURBO}).status_code == 400

    from entrypoints.bootstrap import build_worker

    restarted = build_worker(worker.model_switch.start_settings, backend=backend)  # e.g. after a crash
    assert [m.name for m in restarted.engine.models()] == [BASE] and restarted.settings.model_names == [BASE]
    restarted.model_switch.check_seconds = 0
    assert restarted.model_switch.due(restarted.engine) is None  # loaded directly: nothing left to switch


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(machine):
    client, backend, worker, beat = machine
    assert client.post("/v1/init", json={"model": BROKEN, "wait_seconds": 0}).status_code == 202
    task = submit(client)
    assert worker.run_once(0.01)  # the load fails, the task runs on turbo
    beat()
    assert backend.store.get(task).status == "succeeded"
    assert [m.name for m in worker.engine.models()] == [TURBO]
    for route in ("/v1/models", "/health"):
        data = client.get(route).json()["data"]
        assert data["model_switch"]["state"] == "failed", route
        assert BROKEN in next(iter(data["model_switch"]["errors"].values()))
    assert [m["name"] for m in client.get("/v1/models").json()["data"]["models"]] == [TURBO]
    assert client.post("/v1/init", json={"model": "acestep-v15-nowhere"}).status_code == 409  # not here to load
    assert client.post("/v1/init", json={"model": "../etc"}).status_code == 400

    @contextmanager
    def worker_round_soon():  # the worker's next round, while the request below waits for it
        timer = threading.Timer(0.3, lambda: (worker.run_once(0.01), beat()))
        timer.start()
        try:
            yield
        finally:
            timer.join(60)

    version = worker.model_switch.answered
    with worker_round_soon():  # asked again: one more attempt (upstream's "init again"), failing again
        r = client.post("/v1/init", json={"model": BROKEN, "wait_seconds": 60})
    assert r.status_code == 409 and "failed to load" in r.json()["detail"] and TURBO in r.json()["detail"]
    assert worker.model_switch.answered == version + 1

    checkpoints = Path(worker.model_switch.start_settings.checkpoint_dir)  # the cause fixed: now it loads
    shutil.rmtree(checkpoints / BROKEN)
    os.symlink(checkpoints / BASE, checkpoints / BROKEN)
    with worker_round_soon():
        r = client.post("/v1/reinitialize", json={"wait_seconds": 60})  # retries the set that failed
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["loaded_model"], r.json()["data"]["model_switch"]["state"]) == (BROKEN, "loaded")
    assert [m.name for m in worker.engine.models()] == [BROKEN]
    r = client.post("/v1/reinitialize")  # nothing failed: nothing to retry
    assert r.status_code == 200 and "nothing to reload" in r.json()["data"]["message"]


@pytest.mark.unit
def test_a_set_that_fits_only_alone_replaces_the_old_one_and_a_failure_reloads_it(tmp_path):
    """The memory fit check refused the new set beside the old: the old is dropped first; if the new one then
    fails too, the old set is loaded again (the engine stand-in is the test one: memory cannot be staged here)."""
    from engine.memory import GB, DoesNotFit, check_fits
    from engine.types import GenerationError
    from service.config import Settings
    from service.embedded import make_embedded_backend
    from service.model_set import ModelSet, ask_for
    from service.model_switch import ModelSwitch
    from tests.support_engine import SineEngine

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path), config_path=TURBO)
    store = make_embedded_backend(settings).store
    loads: list[list[str]] = []
    dropped: list[bool] = []

    def load(wanted: Settings):
        loads.append(wanted.model_names)
        if wanted.model_names == [BASE] and len(loads) == 1:
            check_fits(9 * GB, 12 * GB, "cuda:0", BASE, 4 * GB)  # the engine's own refusal: beside the old set
        if wanted.model_names == [BROKEN]:
            check_fits(9 * GB, 8 * GB, "cuda:0", BROKEN)  # does not fit even alone
        if wanted.model_names == [TURBO]:  # same words, but a failed load, not a fit refusal: never dropped for
            raise GenerationError(f"{TURBO} needs about 9.0 GB for weights plus 1.0 GB to generate: corrupt")
        return SineEngine(wanted.model_names)

    switch = ModelSwitch(settings, store, load, does_not_fit=(DoesNotFit,), check_seconds=0)
    ask_for(store, settings, ModelSet(models=[BASE]))
    wish = switch.due(SineEngine([TURBO]))
    assert wish is not None
    done = switch.switch(wish, lambda: dropped.append(True))
    assert done.engine is not None and done.engine.model_names == [BASE] and dropped == [True] and done.error is None
    assert switch.due(done.engine) is None  # answered

    ask_for(store, settings, ModelSet(models=[BROKEN]))
    wish = switch.due(done.engine)
    assert wish is not None
    failed = switch.switch(wish, lambda: dropped.append(True))
    assert loads[-3:] == [[BROKEN], [BROKEN], [BASE]]  # beside, alone, then the old set again
    assert failed.engine is not None and failed.engine.model_names == [BASE] and BROKEN in (failed.error or "")

    ask_for(store, settings, ModelSet(models=[TURBO]))
    wish = switch.due(failed.engine)
    assert wish is not None
    kept = switch.switch(wish, lambda: dropped.append(True))
    assert loads[-1:] == [[TURBO]] and dropped == [True, True] and kept.engine is None  # the old one serves on
    assert "corrupt" in (kept.error or "")


@pytest.mark.unit
def test_a_starting_worker_loads_the_wished_set_directly_or_its_own_when_that_fails(tmp_path):
    from engine.types import GenerationError
    from service.config import Settings
    from service.embedded import make_embedded_backend
    from service.model_set import ModelSet, ask_for
    from service.model_switch import ModelSwitch
    from tests.support_engine import SineEngine

    settings = Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path), config_path=TURBO)
    store = make_embedded_backend(settings).store
    loads: list[list[str]] = []

    def load(wanted: Settings):
        loads.append(wanted.model_names)
        if wanted.model_names == [BROKEN]:
            raise GenerationError("corrupt")
        return SineEngine(wanted.model_names)

    ask_for(store, settings, ModelSet(models=[BROKEN]))
    switch = ModelSwitch(settings, store, load, check_seconds=0)
    engine, used = switch.load_at_start()
    assert loads == [[BROKEN], [TURBO]] and used.model_names == [TURBO] and "corrupt" in (switch.error or "")
    assert switch.due(engine) is None  # the failed wish is answered (the heartbeat says why), not retried

    wish = ask_for(store, settings, ModelSet(models=[BASE]))
    fresh = ModelSwitch(settings, store, load, check_seconds=0)
    engine, used = fresh.load_at_start()
    assert loads[2:] == [[BASE]] and used.model_names == [BASE] and (fresh.answered, fresh.error) == (wish.version, None)
    assert fresh.due(engine) is None
