"""After POST /v1/init switched the models (one machine), every place that names models reads the served set
(service/fleet.served_model_names), not the start-up settings: the OpenAPI `model` enum of /release_task, the
chat API's model names, default and model lists, and the adapter checks (default, fit, upload).

The switch is staged at store level, cheaply: the wish recorded (service/model_set.ask_for) and a live worker's
heartbeat saying it serves the new set, which is what a worker that switched writes (tests/test_model_switch.py
switches a real one).
"""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from engine.adapter_manifest import published_shape
from handlers.app import create_app
from handlers.openrouter import create_openrouter_app
from service.embedded import make_embedded_backend
from service.model_set import ModelSet, ask_for
from service.records import MODELS_META_KEY, ModelEntry, ModelsMeta, WorkerHeartbeat
from service.worker import Worker
from tests.support_engine import SineEngine

pytestmark = pytest.mark.unit
TURBO, BASE = "acestep-v15-turbo", "acestep-v15-base"
KEY = "sk-or-served"


def switched_to(settings, backend, models: list[str]) -> None:
    """What a worker that loaded `models` after POST /v1/init leaves in the store."""
    wish = ask_for(backend.store, settings, ModelSet(models=models))
    now = time.time()
    backend.store.record_heartbeat(WorkerHeartbeat(worker_id="switched", started_at=now, beat_at=now,
                                                   lm_model="none", models=models, models_version=wish.version))


@pytest.fixture
def machine(settings):
    settings = settings.model_copy(update={"config_path": TURBO, "openrouter_api_key": KEY})
    return settings, make_embedded_backend(settings)


def model_enum(client) -> list[str]:
    schema = client.get("/openapi.json").json()["paths"]["/release_task"]["post"]["requestBody"]["content"]
    return schema["application/json"]["schema"]["properties"]["model"]["anyOf"][0]["enum"]


def test_the_openapi_model_enum_follows_a_switch(machine):
    settings, backend = machine
    client = TestClient(create_app(settings, backend))
    assert model_enum(client) == [TURBO]
    switched_to(settings, backend, [BASE, TURBO])
    assert model_enum(client) == [BASE, TURBO]


def test_the_chat_api_names_and_defaults_to_the_served_models(machine):
    settings, backend = machine
    switched_to(settings, backend, [BASE])
    worker = Worker(settings.model_copy(update={"config_path": BASE}), backend, SineEngine([BASE]), worker_id="w")
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_seconds": 0.02}, daemon=True)
    thread.start()
    try:
        client = TestClient(create_openrouter_app(settings, backend, poll_seconds=0.02))
        headers = {"Authorization": f"Bearer {KEY}"}
        for path in ("/v1/models", "/api/v1/models"):
            listed = client.get(path, headers=headers).json()["data"]
            assert [(m["id"], m["is_default"]) for m in listed] == [(f"acestep/{BASE}", True)], path
        body = {"messages": [{"role": "user", "content": "a calm piano"}], "audio_config": {"duration": 10}}
        for model in (f"acestep/{BASE}", None):  # named, then the default
            r = client.post("/v1/chat/completions", json={**body, "model": model}, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == f"acestep/{BASE}"
            assert backend.store.get(r.headers["X-Task-ID"]).request.model == BASE
    finally:
        worker.request_stop()
        thread.join(10)


def test_adapter_default_and_fit_checks_read_the_served_models(machine):
    from engine.request import AdapterRef, GenerationRequest
    from service.adapter_catalog import UPLOADED_META_KEY
    from service.adapter_services import AdapterServices
    from service.adapter_uploads import AdapterUpload
    from service.refusals import AdapterRejected

    settings, backend = machine
    turbo = published_shape(TURBO)
    assert turbo is not None
    deeper = {**turbo.as_dict(), "num_hidden_layers": turbo.num_hidden_layers + 1}
    # Geometries as workers report them: base one layer deeper, so an adapter made for it fits base only.
    backend.store.put_meta(MODELS_META_KEY, ModelsMeta(models=[
        ModelEntry(name=TURBO, adapter_shape=turbo.as_dict()), ModelEntry(name=BASE, adapter_shape=deeper),
    ]).model_dump(mode="json"))
    deep = {"name": "deep", "kind": "lora", "format": "peft_file", "rank": 2, "alpha": 2.0, "size_bytes": 1,
            "num_layers": 2, "shape": deeper, "model": BASE, "source": "uploaded", "where": "adapters/x.safetensors",
            "sha256": "0" * 64, "ext": "safetensors"}  # as POST /v1/adapters indexes one
    backend.store.put_meta(UPLOADED_META_KEY, {"adapters": {"deep": deep}})
    services = AdapterServices.build(settings, backend)
    unnamed = GenerationRequest(prompt="p", adapters=[AdapterRef(name="deep")])  # on the default model
    upload = AdapterUpload(data=b"not an adapter", name="other", model=BASE)

    with pytest.raises(AdapterRejected, match="does not fit model 'acestep-v15-turbo'"):
        services.resolution.resolve(unnamed)
    with pytest.raises(AdapterRejected, match="does not fit model 'acestep-v15-turbo'"):
        services.defaults.load("deep")
    assert services.catalog.models_fitting(services.catalog.find("deep")) == []
    with pytest.raises(AdapterRejected, match="is not served here"):
        services.uploads.register(upload)

    switched_to(settings, backend, [BASE, TURBO])
    assert [a.name for a in services.resolution.resolve(unnamed).adapters] == ["deep"]  # now on base
    assert [a.name for a in services.defaults.load("deep")[0].adapters] == ["deep"]
    assert services.catalog.models_fitting(services.catalog.find("deep")) == [BASE]
    with pytest.raises(AdapterRejected) as refused:  # past the model check: the bytes are no adapter
        services.uploads.register(upload)
    assert "not served" not in str(refused.value)
