"""LoRA/LoKr adapters (issue 24) on the tiny random checkpoints: upstream's trainer layouts load through
diffusers/PEFT, change the audio, stack, switch per batch, and a request without one is untouched bit for bit."""
from __future__ import annotations

import hashlib
import io
import shutil
import zipfile

import pytest

from engine.adapter_builder import build_tiny_adapter, model_shape_at
from engine.adapter_manifest import AdapterInvalid, ModelShape, inspect_adapter, published_shape
from engine.request import AdapterRef, GenerationRequest
from engine.types import GenerationError
from service.records import FailureReason
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import TURBO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def shape(tiny_checkpoint_dir) -> ModelShape:
    return model_shape_at(tiny_checkpoint_dir / TURBO)


@pytest.fixture(scope="module")
def loras(engine, shape):
    """The engine's ACESTEP_LORA_DIR with a PEFT LoRA, a second one, and a LyCORIS LoKr, as upstream's trainer
    writes them (random weights)."""
    root = engine.adapters.lora_dir
    build_tiny_adapter(root / "style", shape, "lora", rank=4, seed=1)
    build_tiny_adapter(root / "other", shape, "lora", rank=2, seed=2)
    from entrypoints.models import main  # the documented tool writes the LoKr

    assert main(["make-tiny-adapter", engine.model(TURBO).info.path, str(root / "kron"), "--kind", "lokr",
                 "--rank", "2", "--seed", "3"]) == 0
    return root


def run(engine, *adapters: AdapterRef, seed: int = 7):
    req = GenerationRequest(prompt="adapter test", lyrics="[instrumental]", audio_duration=10, inference_steps=2,
                            batch_size=1, seeds=[seed], audio_format="wav", model=TURBO, adapters=list(adapters))
    out = engine.generate(req, encode=False)
    return out.pending[0].samples, out.generation_info


def test_the_manifest_reads_upstream_layouts_without_torch_and_checks_the_fit(loras, shape, tmp_path):
    lora = inspect_adapter(loras / "style", shape=shape)
    assert (lora.kind, lora.format, lora.rank, lora.alpha, lora.num_modules, lora.random_weights) == \
        ("lora", "peft_dir", 4, 8.0, 2 * 2 * 4, True)
    assert lora.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    lokr = inspect_adapter(loras / "kron", shape=shape)
    assert (lokr.kind, lokr.format, lokr.rank) == ("lokr", "lycoris_file", 2)
    # a zipped PEFT folder (what a client uploads) reads the same
    zipped = tmp_path / "style.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in (loras / "style").iterdir():
            zf.write(f, f"final/{f.name}")
    assert inspect_adapter(zipped, shape=shape).rank == 4
    # the published 2B DiT is another geometry: refused with a reason, as are files that are not adapters
    with pytest.raises(AdapterInvalid, match="another model"):
        inspect_adapter(loras / "style", shape=published_shape("acestep-v15-turbo"))
    # the load-time fit check counts the adapters on disk (weights files)
    from engine.adapters import local_adapter_bytes

    assert local_adapter_bytes(loras) == sum(f.stat().st_size for f in loras.rglob("*.safetensors")
                                             if ".uploaded" not in f.parts)
    garbage = tmp_path / "x.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterInvalid, match="not a safetensors file"):
        inspect_adapter(garbage)


@pytest.fixture(scope="module")
def outputs(engine, loras):
    """The same request without an adapter and with the LoRA (each generation costs ~1 s of CPU: made once)."""
    return {"base": run(engine), "style": run(engine, AdapterRef(name="style", scale=1.0))}


def test_an_adapter_changes_the_audio_and_scale_zero_is_bit_identical(engine, outputs):
    import numpy as np

    (base, info), (styled, styled_info) = outputs["base"], outputs["style"]
    assert info["adapters"] == []
    assert styled_info["adapters"][0] | {"rank": 0} == {"name": "style", "scale": 1.0, "kind": "lora", "rank": 0,
                                                         "random_weights": True}
    assert np.abs(styled - base).max() > 1e-3
    # with the adapter still loaded: scale 0 gives the DiT's own output bit for bit
    zero, _ = run(engine, AdapterRef(name="style", scale=0.0))
    assert np.array_equal(zero, base)


def test_lokr_loads_and_matches_lycoris_math(engine, loras, outputs):
    """The LyCORIS file becomes PEFT LoKr layers whose weight delta is kron(w1, w2_a @ w2_b) * alpha / rank."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    kron, info = run(engine, AdapterRef(name="kron"))
    assert info["adapters"][0]["kind"] == "lokr"
    assert np.abs(kron - outputs["base"][0]).max() > 1e-3
    w = load_file(str(loras / "kron" / "lokr_weights.safetensors"))
    p = "lycoris_layers_1_cross_attn_k_proj"
    expected = torch.kron(w[f"{p}.lokr_w1"], w[f"{p}.lokr_w2_a"] @ w[f"{p}.lokr_w2_b"]) * (w[f"{p}.alpha"] / 2)
    layer = engine.model(TURBO).pipe.transformer.layers[1].cross_attn.to_k
    name = next(n for n in layer.lokr_w1)
    assert torch.allclose(layer.get_delta_weight(name), expected, atol=1e-6)


def test_stacked_adapters_add_up_and_switching_is_warm(engine, loras):
    """At the DiT's layers (no generation needed): two adapters at their scales act as the sum of each alone;
    switching between sets reloads nothing; a missing adapter is the task's error."""
    import torch

    pipe = engine.model(TURBO).pipe
    layer = pipe.transformer.layers[0].self_attn.to_q
    x = torch.randn(1, 5, layer.in_features, generator=torch.Generator().manual_seed(0))

    def delta(*refs):
        engine.adapters.activate(TURBO, pipe, list(refs))
        with torch.no_grad():
            out = layer(x)
        engine.adapters.activate(TURBO, pipe, [])
        with torch.no_grad():
            return out - layer(x)

    style, other = delta(AdapterRef(name="style", scale=0.7)), delta(AdapterRef(name="other", scale=-0.5))
    loaded = len(engine.adapters.loaded())
    both = delta(AdapterRef(name="style", scale=0.7), AdapterRef(name="other", scale=-0.5))
    assert torch.allclose(both, style + other, atol=1e-6) and style.abs().max() > 1e-3
    assert len(engine.adapters.loaded()) == loaded  # warm: set_adapters, no load
    with pytest.raises(GenerationError, match="no adapter named 'nope'"):
        run(engine, AdapterRef(name="nope"))


def test_requests_with_different_adapters_never_share_a_call_and_each_gets_its_own(engine, outputs, settings,
                                                                                      tmp_path):
    """Three queued tasks -- a local LoRA, an uploaded single-file LoRA, none -- run by one worker with batching
    on: each result equals its request run alone."""
    import numpy as np

    from engine import plan
    from service.blob_keys import adapter_key
    from service.embedded import make_embedded_backend
    from service.worker import Worker
    from engine.audio_encode import encode_pending
    from engine.types import PendingAudio
    from tests.engine_fixtures import decode
    from tests.worker_support import submit

    single = build_tiny_adapter(tmp_path / "uploaded", model_shape_at(engine.model(TURBO).info.path), rank=2, seed=5,
                                single_file=True)
    data = single.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    settings = settings.model_copy(update={"batch_compatible_tasks": True,
                                           "adapter_cache_dir": str(engine.adapters.cache_dir)})
    backend = make_embedded_backend(settings)
    backend.blobs.put(adapter_key(sha, "safetensors"), data, "application/octet-stream")
    refs = {"local": [AdapterRef(name="style")], "uploaded": [AdapterRef(name="mine", scale=0.8, sha256=sha)],
            "none": []}
    fields = dict(prompt="adapter test", lyrics="[instrumental]", inference_steps=2, seeds=[7], audio_format="wav",
                  model=TURBO)
    keys = {plan.batch_key(GenerationRequest(adapters=a, **fields), TURBO) for a in refs.values()}
    assert len(keys) == 3  # the adapters are part of what a batch must share
    ids = {label: submit(backend, adapters=a, **fields) for label, a in refs.items()}
    worker = Worker(settings, backend, engine)
    while worker.run_once(0.0):
        pass
    for label, task_id in ids.items():
        record = backend.store.get(task_id)
        assert record.status == "succeeded", record.error
        got, _ = decode(backend.blobs.get(record.result.audios[0].key))
        if label == "uploaded":
            want = run(engine, *refs[label])[0]
        else:
            want = outputs["style" if label == "local" else "base"][0]
        want, _ = decode(encode_pending(PendingAudio(want, "wav", 48000, want.shape[0], want.shape[1] / 48000, 7))[0].data)
        assert np.array_equal(got, want), label
        assert [a["name"] for a in record.result.generation_info["adapters"]] == [a.name for a in refs[label]]
    # the worker publishes the adapters on its disk, with the models each fits, for the API to list and check
    worker.publish_models()
    listed = {a["name"]: a for a in backend.store.get_meta("adapters_local")["adapters"]}
    assert listed["kron"]["kind"] == "lokr" and listed["style"]["random_weights"] is True
    assert TURBO in listed["style"]["models"]
    # heartbeats say what is loaded, so the API can prefer a worker that holds an adapter
    assert f"{TURBO}/style" in worker.heartbeat().adapters
    # an uploaded adapter whose bytes are gone fails its task with the reason, and the worker goes on
    gone = submit(backend, adapters=[AdapterRef(name="lost", sha256="0" * 64)], **fields)
    while worker.run_once(0.0):
        pass
    assert "missing from storage" in backend.store.get(gone).error
    assert backend.store.get(gone).reason == FailureReason.ADAPTER_MISSING
    # a folder under ACESTEP_LORA_DIR deleted after it was listed: its own reason, and a message naming it
    build_tiny_adapter(engine.adapters.lora_dir / "brief", model_shape_at(engine.model(TURBO).info.path), rank=2)
    brief = submit(backend, adapters=[AdapterRef(name="brief")], **fields)
    shutil.rmtree(engine.adapters.lora_dir / "brief")
    while worker.run_once(0.0):
        pass
    record = backend.store.get(brief)
    assert (record.status, record.reason) == ("failed", FailureReason.ADAPTER_MISSING)
    assert "no adapter named 'brief'" in record.error


def test_a_kohya_style_file_is_converted_once_and_acts_as_its_peft_twin(engine, loras, shape, tmp_path):
    """lora_unet_..., lora_down/lora_up/alpha (as ComfyUI-style tools write): checked like any adapter, converted
    once to upstream's PEFT layout under the adapter cache, and acting exactly as the same weights in PEFT form;
    a key that names no DiT module is refused naming it."""
    import torch
    from safetensors.torch import load_file, save_file

    kohya = build_tiny_adapter(loras / "kohya-style", shape, "lora", rank=4, seed=1, kohya=True)  # "style"'s weights
    info = inspect_adapter(kohya, shape=shape)
    assert (info.kind, info.format, info.rank, info.alpha, info.num_modules) == ("lora", "kohya_file", 4, 8.0, 16)
    pipe = engine.model(TURBO).pipe
    x = torch.randn(1, 5, shape.hidden_size, generator=torch.Generator().manual_seed(0))

    def delta(name):
        engine.adapters.activate(TURBO, pipe, [AdapterRef(name=name, scale=0.5)])
        layer = pipe.transformer.layers[1].cross_attn.to_v  # PEFT wraps the linear on the first load
        with torch.no_grad():
            out = layer(x)
        engine.adapters.activate(TURBO, pipe, [])
        with torch.no_grad():
            return out - layer(x)

    got, want = delta("kohya-style"), delta("style")
    assert torch.allclose(got, want, atol=1e-6) and want.abs().max() > 1e-3
    converted = list((engine.adapters.cache_dir / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "adapter_config.json").is_file()
    assert [a["name"] for a in engine.adapters.loaded() if a["name"] == "kohya-style"] == ["kohya-style"]

    state = load_file(str(kohya))
    state["lora_unet_decoder_layers_0_norm1.lora_down.weight"] = torch.zeros(4, shape.hidden_size)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(AdapterInvalid, match=r"'lora_unet_decoder_layers_0_norm1\.lora_down\.weight' \(kohya-style\)"):
        inspect_adapter(bad, shape=shape)
