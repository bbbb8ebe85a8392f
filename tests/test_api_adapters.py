"""Adapters through the API on both backends (moto for AWS): upload (checked against the model), listing,
a request's `adapter`/`adapter_scale` settled at submit (400 for an unknown or unfitting one), upstream's
/v1/lora/* as the fleet's default, and /v1/init, /v1/model_inventory, /v1/reinitialize.

The adapters are tiny safetensors files written here (headers + zero bytes) in the shapes of the published
ACE-Step 1.5 DiT (the default model, acestep-v15-turbo): the API reads only headers, never tensor data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.adapter_manifest import DIFFUSERS_METADATA_KEY
from handlers.app import create_app
from tests.adapter_support import SHAPE, lora_file


@pytest.fixture
def api(backend, settings):
    if backend.name == "aws":
        settings = backend.settings.model_copy(update={"checkpoint_dir": settings.checkpoint_dir})
    return settings, backend, TestClient(create_app(settings, backend))


def upload(client, data: bytes, **params):
    return client.post("/v1/adapters", content=data, params=params,
                       headers={"Content-Type": "application/octet-stream"})


def test_upload_list_and_request_with_an_adapter(api):
    settings, backend, client = api
    data = lora_file()
    r = upload(client, data, name="style-a")
    assert r.status_code == 200, r.text
    stored = r.json()["data"]["adapter"]
    assert stored["where"].startswith("adapters/") and stored["where"].endswith(".safetensors")
    assert (stored["type"], stored["rank"], stored["model"], stored["source"]) == ("lora", 2, "acestep-v15-turbo", "uploaded")
    assert backend.blobs.get(stored["where"]) == data
    assert upload(client, data, name="style-a").json()["data"]["created"] is False  # same bytes, same name
    assert upload(client, lora_file(rank=4), name="style-a").status_code == 409  # another file under that name

    listed = client.get("/v1/adapters").json()["data"]
    assert [(a["name"], a["fits_models"], a["size_bytes"]) for a in listed["adapters"]] == \
        [("style-a", ["acestep-v15-turbo"], len(data))]

    r = client.post("/release_task", json={"prompt": "p", "adapter": "style-a", "adapter_scale": 0.5})
    assert r.status_code == 200, r.text
    request = backend.store.get(r.json()["data"]["task_id"]).request
    assert [(a.name, a.scale, a.sha256) for a in request.adapters] == [("style-a", 0.5, stored["sha256"])]

    # a client's own sha256 is not trusted: the stored adapter's wins
    r = client.post("/release_task", json={"prompt": "p", "adapters": [{"name": "style-a", "sha256": "0" * 64}]})
    assert backend.store.get(r.json()["data"]["task_id"]).request.adapters[0].sha256 == stored["sha256"]

    for body, words in (({"adapter": "nope"}, "no adapter named 'nope'"),
                        ({"adapter": "style-a", "adapter_scale": 7}, "adapter_scale: must be between"),
                        ({"adapter": "a,b", "adapter_scale": [1, 2, 3]}, "one scale per adapter"),
                        ({"adapter_scale": 1}, "needs `adapter`")):
        r = client.post("/release_task", json={"prompt": "p", **body})
        assert r.status_code == 400 and words in r.json()["detail"], (body, r.text)
    assert backend.store.counts()["total"] == 2


def test_a_bad_adapter_is_a_400_and_nothing_is_kept(api):
    settings, backend, client = api
    r = upload(client, lora_file(in_features=1000), name="wrong-model")
    assert r.status_code == 400 and "wrong-model" not in json.dumps(client.get("/v1/adapters").json()["data"]["adapters"])
    assert "1000" in r.json()["detail"], r.text
    assert upload(client, b"not an adapter at all", name="junk").status_code == 400
    # JSON nested past the parser's recursion limit, as the header or as the config in its metadata: 400, was 500
    nested = b"[" * 50000 + b"]" * 50000
    config = json.dumps({"__metadata__": {DIFFUSERS_METADATA_KEY: nested.decode()}}).encode()
    for header in (nested, config):
        r = upload(client, struct.pack("<Q", len(header)) + header, name="nested")
        assert r.status_code == 400 and "JSON" in r.json()["detail"], r.text
    assert upload(client, lora_file(), name="x", model="no-such-model").status_code == 400
    small = TestClient(create_app(settings.model_copy(update={"max_adapter_mb": 1}), backend))
    assert upload(small, lora_file(layers=24, rank=16), name="big").status_code == 413
    assert client.get("/v1/adapters").json()["data"]["adapters"] == []


def test_upload_by_ticket(api):
    settings, backend, client = api
    ticket = client.post("/v1/adapters/uploads", json={"filename": "ticketed.safetensors"}).json()["data"]
    data = lora_file()
    if backend.name == "aws":
        assert ticket["upload_url"].startswith("http")
        backend.blobs.put(ticket["key"], data, "application/octet-stream")  # what the client's PUT to S3 does
    else:
        assert client.put(ticket["upload_url"], content=data).status_code == 200
    r = client.post("/v1/adapters", json={"key": ticket["key"]})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["adapter"]["name"] == "ticketed"
    assert backend.blobs.size(ticket["key"]) is None  # the pending upload is gone: kept under its sha256
    assert client.post("/v1/adapters", json={"key": ticket["key"]}).status_code == 400


def test_adapters_under_the_lora_dir(api):
    settings, backend, client = api
    loras = Path(settings.checkpoint_dir) / "loras"
    (loras / "peft-style" / "final").mkdir(parents=True)
    (loras / "peft-style" / "final" / "adapter_model.safetensors").write_bytes(lora_file())
    (loras / "peft-style" / "final" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
    (loras / "misfit.safetensors").write_bytes(lora_file(in_features=1000))
    listed = client.get("/v1/adapters").json()["data"]
    assert [(a["name"], a["source"], a["alpha"]) for a in listed["adapters"]] == [("peft-style", "lora_dir", 4.0)]
    assert "misfit.safetensors" in listed["unusable"]
    r = client.post("/release_task", json={"prompt": "p", "lora_name": "peft-style"})
    assert r.status_code == 200, r.text
    assert backend.store.get(r.json()["data"]["task_id"]).request.adapters[0].sha256 is None
    r = client.post("/release_task", json={"prompt": "p", "adapter": "misfit"})
    assert r.status_code == 400 and "not usable" in r.json()["detail"]
    assert upload(client, lora_file(), name="peft-style").status_code == 409  # a local adapter has the name


def test_lora_routes_set_the_fleets_default(api):
    settings, backend, client = api
    assert upload(client, lora_file(), name="house").status_code == 200
    status = client.get("/v1/lora/status").json()["data"]
    assert (status["lora_loaded"], status["use_lora"], status["adapters"]) == (False, False, [])

    def submitted(**body) -> list:
        r = client.post("/release_task", json={"prompt": "p", **body})
        assert r.status_code == 200, r.text
        return [(a.name, a.scale) for a in backend.store.get(r.json()["data"]["task_id"]).request.adapters]

    assert client.post("/v1/lora/toggle", json={"use_lora": True}).status_code == 400  # nothing loaded
    assert client.post("/v1/lora/load", json={"lora_path": "missing"}).status_code == 400
    r = client.post("/v1/lora/load", json={"lora_path": "/anywhere/house.safetensors"})
    assert r.status_code == 200 and r.json()["data"]["lora_path"] == "/anywhere/house.safetensors"
    assert submitted() == [("house", 1.0)]
    assert submitted(adapter="") == []  # the client's own choice: none
    assert client.post("/v1/lora/scale", json={"scale": 0.25}).json()["data"]["scale"] == 0.25
    status = client.get("/v1/lora/status").json()["data"]
    assert (status["lora_loaded"], status["use_lora"], status["lora_scale"], status["adapter_type"]) == \
        (True, True, 0.25, "lora")
    assert status["scales"] == {"house": 0.25} and status["active_adapter"] == "house"
    assert submitted() == [("house", 0.25)]
    assert client.post("/v1/lora/toggle", json={"use_lora": False}).json()["data"]["use_lora"] is False
    assert submitted() == []
    client.post("/v1/lora/toggle", json={"use_lora": True})
    assert client.post("/v1/lora/unload").status_code == 200
    assert submitted() == [] and client.get("/v1/lora/status").json()["data"]["lora_loaded"] is False
    assert "no default adapter" in client.post("/v1/lora/unload").json()["data"]["message"]


def test_model_routes_answer_what_the_fleet_runs(api):
    settings, backend, client = api
    inventory = client.get("/v1/model_inventory").json()["data"]
    assert [(m["name"], m["is_default"], m["is_loaded"]) for m in inventory["models"]] == [("acestep-v15-turbo", True, False)]
    assert "text2music" in inventory["models"][0]["supported_task_types"]
    assert (inventory["lm_models"], inventory["llm_initialized"]) == ([], False)
    assert client.get("/v1/models").json()["data"]["models"] == inventory["models"]
    r = client.post("/v1/init", json={"model": "acestep-v15-turbo"})
    assert r.status_code == 200 and r.json()["data"]["loaded_model"] == "acestep-v15-turbo"
    r = client.post("/v1/init", json={"slot": 2, "model": "acestep-v15-turbo"})  # a model it serves in slot 1
    assert r.status_code == 200 and r.json()["data"]["loaded_model"] == "acestep-v15-turbo"
    r = client.post("/v1/init", json={"model": "acestep-v15-base"})
    if backend.name == "aws":  # the deploy's set: the 409 names the CDK context to change
        assert r.status_code == 409 and "npx cdk deploy -c config_path=<model>" in r.json()["detail"]
        assert client.post("/v1/init", json={"init_llm": True}).status_code == 409  # no worker runs the LM
    else:  # one machine: recorded for the workers (none runs here: the next to start loads it)
        assert r.status_code == 202 and r.json()["data"]["model_switch"]["state"] == "waiting"
        assert client.post("/v1/init", json={"model": "no-such-model"}).status_code == 409
    r = client.post("/v1/reinitialize")
    assert r.status_code == 200 and "Service reinitialized" in r.json()["data"]["message"]


def test_delete_an_uploaded_adapter(api):
    settings, backend, client = api
    data = lora_file()
    key = upload(client, data, name="one").json()["data"]["adapter"]["where"]
    assert upload(client, data, name="same-bytes").status_code == 200  # one blob, two names
    loras = Path(settings.checkpoint_dir) / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "local.safetensors").write_bytes(lora_file())

    r = client.delete("/v1/adapters/local")  # the operator's file: never removed through the API
    assert r.status_code == 409 and "ACESTEP_LORA_DIR" in r.json()["detail"]
    assert (loras / "local.safetensors").is_file()
    assert client.delete("/v1/adapters/nothing-here").status_code == 404

    client.post("/v1/lora/load", json={"lora_path": "one"})
    r = client.delete("/v1/adapters/one")
    assert r.status_code == 409 and "default" in r.json()["detail"]
    client.post("/v1/lora/unload")
    task = client.post("/release_task", json={"prompt": "p", "adapter": "one"}).json()["data"]["task_id"]
    r = client.delete("/v1/adapters/one")
    assert r.status_code == 409 and "1 queued or running task" in r.json()["detail"] and task in r.json()["detail"]
    backend.store.cancel(task, "test")

    r = client.delete("/v1/adapters/one")
    assert r.status_code == 200 and r.json()["data"] == {"name": "one", "deleted": True}
    assert backend.blobs.size(key) == len(data)  # "same-bytes" still refers to them
    assert [a["name"] for a in client.get("/v1/adapters").json()["data"]["adapters"]] == ["local", "same-bytes"]
    assert client.delete("/v1/adapters/one").status_code == 404
    assert client.delete("/v1/adapters/same-bytes").status_code == 200
    assert backend.blobs.size(key) is None  # no name refers to them now
    assert client.post("/release_task", json={"prompt": "p", "adapter": "one"}).status_code == 400


def test_two_interleaved_writers_both_land(api):
    """Writer A reads the index, writer B reads and writes it, then A writes: A's conditional write loses and
    is redone on B's index (the same for the fleet's default), so neither change is lost."""
    settings, backend, client = api
    services = client.app.state.submitter.adapters
    from service.adapter_uploads import AdapterUpload

    calls = []
    original = backend.store.get_meta_versioned

    def read_then_let_b_write(key):
        value = original(key)
        if not calls:  # A's first read: B's whole upload lands before A writes
            calls.append(key)
            services.uploads.register(AdapterUpload(lora_file(rank=4), "b.safetensors"))
        return value

    backend.store.get_meta_versioned = read_then_let_b_write
    try:
        services.uploads.register(AdapterUpload(lora_file(rank=2), "a.safetensors"))
    finally:
        backend.store.get_meta_versioned = original
    assert sorted(services.catalog.uploaded(fresh=True).adapters) == ["a", "b"]

    value, version = backend.store.get_meta_versioned("adapters_uploaded")
    assert backend.store.put_meta_if("adapters_uploaded", value, version) is True
    assert backend.store.put_meta_if("adapters_uploaded", {}, version) is False  # stale version: nothing written
    assert sorted(backend.store.get_meta("adapters_uploaded")["adapters"]) == ["a", "b"]

    calls.clear()

    def read_then_let_b_load(key):
        value = original(key)
        if not calls:
            calls.append(key)
            services.defaults.load("b", "second")
        return value

    backend.store.get_meta_versioned = read_then_let_b_load
    try:
        services.defaults.load("a", "first")
    finally:
        backend.store.get_meta_versioned = original
    assert client.get("/v1/lora/status").json()["data"]["adapters"] == ["second", "first"]


def test_a_default_whose_folder_is_gone_is_kept_so_the_task_says_so(api):
    """The fleet's default names a folder under ACESTEP_LORA_DIR deleted since: a request without `adapter` still
    names it (the worker fails the task with FailureReason.ADAPTER_MISSING naming it), not a quiet run without."""
    settings, backend, client = api
    loras = Path(settings.checkpoint_dir) / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "house.safetensors").write_bytes(lora_file())
    assert client.post("/v1/lora/load", json={"lora_path": "house"}).status_code == 200
    (loras / "house.safetensors").unlink()
    r = client.post("/release_task", json={"prompt": "p"})
    assert r.status_code == 200, r.text
    adapters = backend.store.get(r.json()["data"]["task_id"]).request.adapters
    assert [(a.name, a.sha256) for a in adapters] == [("house", None)]


def test_release_task_documents_the_adapter_fields(api):
    settings, backend, client = api
    body = client.get("/openapi.json").json()["paths"]["/release_task"]["post"]["requestBody"]["content"]
    props = body["application/json"]["schema"]["properties"]
    for name in ("adapter", "lora_name"):
        kinds = [o.get("type") for o in props[name]["anyOf"]]
        assert kinds == ["string", "array", "null"] and "GET /v1/adapters" in props[name]["description"]
    for name in ("adapter_scale", "lora_scale"):
        assert props[name]["anyOf"][0] == {"type": "number", "minimum": -2.0, "maximum": 2.0}
    form = body["application/x-www-form-urlencoded"]["schema"]["properties"]
    assert {"adapter", "adapter_scale", "lora_name", "lora_scale"} <= set(form)


def test_on_lambda_a_big_body_upload_is_a_413_pointing_to_the_upload_url(api):
    """Through Mangum (as on Lambda): a body over 6 MB is refused before it is parsed, with the way that works."""
    import base64

    from mangum import Mangum

    from entrypoints.snapstart import api_gateway_event

    settings, backend, client = api
    handler = Mangum(client.app, lifespan="off")

    def post(data: bytes, name: str) -> dict:
        event = api_gateway_event("POST", "/v1/adapters", None)
        event["headers"].update({"content-type": "application/octet-stream", "content-length": str(len(data))})
        event["rawQueryString"] = f"name={name}"
        event["body"], event["isBase64Encoded"] = base64.b64encode(data).decode(), True
        return handler(event, None)

    small = post(lora_file(), "small")
    assert small["statusCode"] == 200, small["body"]
    big = post(lora_file(layers=24, rank=24), "big")  # ~7.9 MB: under ACESTEP_MAX_ADAPTER_MB, over Lambda's limit
    assert big["statusCode"] == 413 and "POST /v1/adapters/uploads" in json.loads(big["body"])["detail"], big
    assert [a["name"] for a in client.get("/v1/adapters").json()["data"]["adapters"]] == ["small"]


def kohya_file(extra_key: str = "") -> bytes:
    """A kohya-ss style LoRA (lora_unet_decoder_layers_N_..., lora_down/lora_up/alpha), headers + zero bytes."""
    assert SHAPE is not None
    q = SHAPE.num_attention_heads * SHAPE.head_dim
    shapes = {"lora_unet_decoder_layers_0_self_attn_q_proj.lora_down.weight": [2, SHAPE.hidden_size],
              "lora_unet_decoder_layers_0_self_attn_q_proj.lora_up.weight": [q, 2],
              "lora_unet_decoder_layers_0_self_attn_q_proj.alpha": []}
    if extra_key:
        shapes[extra_key] = [2, 2]
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * (shape[0] * shape[1] if shape else 1)
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def test_a_kohya_style_upload_is_taken_and_an_unmappable_key_named(api):
    settings, backend, client = api
    r = upload(client, kohya_file(), name="from-comfy")
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["adapter"]["format"], r.json()["data"]["adapter"]["rank"]) == ("kohya_file", 2)
    r = upload(client, kohya_file("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"), name="with-te")
    assert r.status_code == 400 and "'lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight'" in r.json()["detail"]
