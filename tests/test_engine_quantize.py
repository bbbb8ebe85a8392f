"""ACESTEP_QUANTIZE (engine/quantize.py, issue 25): int8 weight-only on the tiny DiT and the tiny LM loads, runs,
stores a byte per Linear weight (the fit check counts it), stays close to the unquantised model without being
it, is reported; adapters still act on an int8 DiT; fp8 on CPU and a bad value are refused at start.

Tolerance: int8 with one scale per output row rounds each weight by at most half a step (max|row| / 254), a
relative RMS error of ~0.2-0.4 % per layer; measured 0.15 % on the tiny DiT's output (and its audio) and
~0.5 % on the tiny LM's logits. The bound of 3 % leaves room for the machine's float paths, and still fails for a wrong scale (a whole
tensor's scale, or int4: several %), a layer left broken (tens of %), or no quantisation at all (0)."""
from __future__ import annotations

import pytest
import torch

from engine import lm_bridge, memory, quantize
from engine.adapter_builder import build_tiny_adapter, model_shape_at
from engine.config import EngineConfig
from engine.request import AdapterRef, GenerationRequest
from engine.types import GenerationError
from tests.engine_fixtures import TURBO, tiny_checkpoint_dir  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CLOSE = 0.03


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.fixture(scope="module")
def int8_engine(tiny_checkpoint_dir, tmp_path_factory):  # noqa: F811
    from engine.service import Engine

    loras = tmp_path_factory.mktemp("int8-loras")
    shape = model_shape_at(tiny_checkpoint_dir / TURBO)
    build_tiny_adapter(loras / "style", shape, "lora", rank=4, seed=1)
    build_tiny_adapter(loras / "kron", shape, "lokr", rank=2, seed=3)
    return Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO], dtype="float32",
                                    allow_download=False, quantize="int8", lora_dir=str(loras)))


@pytest.fixture(scope="module")
def generated(int8_engine):
    """One generation on the int8 engine, and the DiT's inputs at its first step (the tests below rerun the DiT
    alone on them: the VAE decode, untouched by ACESTEP_QUANTIZE, is most of a generation's time)."""
    transformer = int8_engine.model(TURBO).pipe.transformer
    calls: list = []
    hook = transformer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, kwargs)),
                                                 with_kwargs=True)
    try:
        out = int8_engine.generate(GenerationRequest(prompt="quantised", lyrics="[instrumental]", audio_duration=10,
                                                     inference_steps=2, seeds=[11], audio_format="wav"),
                                   encode=False)
    finally:
        hook.remove()
    return out, calls[0]


def dit_output(transformer, inputs) -> torch.Tensor:
    args, kwargs = inputs
    with torch.inference_mode():
        out = transformer(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out.sample).float()


def test_int8_dit_stores_a_byte_per_weight_counts_it_and_stays_close(int8_engine, generated,
                                                                     tiny_checkpoint_dir):  # noqa: F811
    from diffusers import AceStepTransformer1DModel

    model_dir = tiny_checkpoint_dir / TURBO
    quant = int8_engine.model(TURBO).pipe.transformer
    full = AceStepTransformer1DModel.from_pretrained(str(model_dir / "transformer"), dtype=torch.float32).eval()
    assert type(quant.layers[0].self_attn.to_q.weight).__name__ == "Int8Tensor"
    stored, unquantised = quantize.storage_bytes(quant), quantize.storage_bytes(full)
    assert stored < 0.35 * unquantised  # float32 -> int8: about a quarter, plus scales and the norms' vectors
    # the fit check's estimate from the file headers: never below what is stored, within 5 %, and for the whole
    # model only the DiT's share changes
    estimate = memory.weight_bytes(model_dir / "transformer", "float32", quantize="int8")
    assert stored <= estimate <= 1.05 * stored
    saved = memory.weight_bytes(model_dir, "float32") - memory.weight_bytes(
        model_dir, "float32", quantize="int8", quantized_components=["transformer"])
    assert saved == memory.weight_bytes(model_dir / "transformer", "float32") - estimate > 0

    _out, inputs = generated
    assert 0 < rel_error(dit_output(quant, inputs), dit_output(full, inputs)) < CLOSE


def test_the_result_and_describe_say_int8(int8_engine, generated):
    out, _inputs = generated
    assert out.generation_info["quantization"] == {"dit": "int8", "lm": "none"}
    assert out.pending[0].samples.shape[-1] == 10 * 48000
    assert int8_engine.describe()["quantization"] == {"dit": "int8", "lm": "none"}


def test_lora_and_lokr_still_act_on_an_int8_dit(int8_engine, generated):
    pipe = int8_engine.model(TURBO).pipe
    _out, inputs = generated
    plain = dit_output(pipe.transformer, inputs)
    for name in ("style", "kron"):
        acting = int8_engine.adapters.activate(TURBO, pipe, [AdapterRef(name=name, scale=1.0)])
        assert [a["name"] for a in acting] == [name]
        assert rel_error(dit_output(pipe.transformer, inputs), plain) > 0.02  # the adapter acts
    int8_engine.adapters.activate(TURBO, pipe, [])
    assert torch.equal(dit_output(pipe.transformer, inputs), plain)  # switched off: the int8 layers alone, bit for bit


def test_int8_lm_quantises_its_layers_but_not_the_tied_head_and_stays_close(tmp_path):
    from engine.lm.tiny import build_tiny_lm
    from engine.lm.transformers_backend import TransformersLM

    folder = build_tiny_lm(tmp_path / "lm", audio_codes=64)
    full = TransformersLM.load(folder, dtype=torch.float32)
    # as the engine loads it: ACESTEP_QUANTIZE_LM through the planner's loader
    config = EngineConfig(checkpoint_dir=str(tmp_path), lm_model=str(folder), lm_backend="pt", quantize_lm="int8")
    quant = lm_bridge.load_planner(config, "cpu", torch.float32).backend
    layer = quant.model.model.layers[0]
    assert type(layer.mlp.up_proj.weight).__name__ == "Int8Tensor"
    head, embed = quant.model.get_output_embeddings(), quant.model.get_input_embeddings()
    assert head.weight is embed.weight and type(head.weight) is torch.nn.Parameter  # still one matrix, unquantised
    stored = quantize.storage_bytes(quant.model)
    assert stored < quantize.storage_bytes(full.model)
    estimate = memory.weight_bytes(folder, "float32", quantize="int8")
    assert 0.99 * stored <= estimate <= 1.05 * stored  # the files hold all but the rotary table (a buffer)

    ids = torch.tensor([full.encode("a soft piano ballad")])
    with torch.inference_mode():
        want, got = full.model(input_ids=ids).logits, quant.model(input_ids=ids).logits
    assert 0 < rel_error(got, want) < CLOSE


def test_fp8_on_cpu_is_refused_at_start_with_the_reason(tiny_checkpoint_dir):  # noqa: F811
    from engine.service import Engine

    with pytest.raises(GenerationError, match="fp8 quantisation needs a CUDA GPU.*ACESTEP_QUANTIZE=int8"):
        Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO],
                                 allow_download=False, quantize="fp8"))


def test_the_setting_is_checked_when_settings_are_built_and_reaches_the_engine():
    from entrypoints.bootstrap import engine_config
    from service.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="ACESTEP_QUANTIZE .*int4"):
        load_settings(env={"ACESTEP_QUANTIZE": "int4"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="ACESTEP_QUANTIZE_LM"):
        load_settings(env={"ACESTEP_QUANTIZE_LM": "q4"}, dotenv_path=None)
    with pytest.raises(ValueError, match="ACESTEP_QUANTIZE_DIT='int4' is not a quantisation mode"):
        EngineConfig.from_env({"ACESTEP_QUANTIZE": "int4"})

    config = engine_config(load_settings(env={"ACESTEP_QUANTIZE": "int8", "ACESTEP_QUANTIZE_LM": "none"},
                                         dotenv_path=None))
    assert (config.quantize, config.quantize_lm) == ("int8", "none")
    assert EngineConfig.from_env({"ACESTEP_QUANTIZE_LM": "int8"}).quantize == "none"
    assert EngineConfig.from_env({"ACESTEP_QUANTIZE_LM": "int8"}).quantize_lm == "int8"


def test_v1_models_says_what_the_worker_quantised(settings):
    from tests.api_support import make_api

    api = make_api(settings)
    assert "quantization" not in api.client.get("/v1/models").json()["data"]  # no worker has said yet
    api.worker.publish_models()  # the test engine's describe(): nothing quantised
    assert api.client.get("/v1/models").json()["data"]["quantization"] == {"dit": "none", "lm": "none"}


def test_a_quantised_model_must_fit_at_full_precision_while_it_loads(tiny_checkpoint_dir, monkeypatch):  # noqa: F811
    """It is loaded whole and quantised after: room for the int8 weights alone is refused, with numbers."""
    from engine.service import Engine

    config = EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO], dtype="float32",
                          device="cpu", allow_download=False, quantize="int8")
    path = tiny_checkpoint_dir / TURBO
    int8 = memory.weight_bytes(path, "float32", quantize="int8", quantized_components=["transformer"])
    full = memory.weight_bytes(path, "float32")
    assert int8 < full
    monkeypatch.setattr(memory, "workspace_bytes", lambda *a: 0)  # the tiny model's weights alone decide
    monkeypatch.setattr(memory, "free_bytes", lambda device: (int8 + full) // 2)
    with pytest.raises(memory.DoesNotFit, match=r"loaded in float32, then quantised to int8"):
        Engine.load(config)


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges this process maps from `path` (/proc/self/maps)."""
    import os

    real, ranges = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def plain_tensors_inside(module, ranges) -> list[str]:
    """Names of the module's unquantised tensors whose memory lies in one of `ranges`."""
    inside = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            ptr = tensor.untyped_storage().data_ptr()
            if any(start <= ptr < end for start, end in ranges):
                inside.append(name)
    return inside


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_quantising_releases_the_weight_file_mapping(tmp_path):
    """Loaded from safetensors on CPU, every tensor is a view into the file's one mapping; after quantising, the
    norms and biases left as they were must not keep it (and every page quantising read) resident."""
    import gc

    from safetensors.torch import load_file, save_file

    def build():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))

    path = tmp_path / "model.safetensors"
    save_file(build().state_dict(), str(path))
    model = build()
    model.load_state_dict(load_file(str(path)), assign=True)
    ranges = file_mappings(path)
    assert ranges and plain_tensors_inside(model, ranges) == ["0.weight", "0.bias", "1.weight", "1.bias",
                                                               "2.weight", "2.bias"]  # mapped, as loaded
    assert quantize.quantize_module(model, "int8") == 2
    gc.collect()
    assert plain_tensors_inside(model, ranges) == [] and file_mappings(path) == []
    assert torch.equal(model[1].weight, load_file(str(path))["1.weight"])  # copied, not changed


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_the_engines_int8_dit_holds_nothing_in_its_weight_file(int8_engine, tiny_checkpoint_dir):  # noqa: F811
    transformer = int8_engine.model(TURBO).pipe.transformer
    files = sorted((tiny_checkpoint_dir / TURBO / "transformer").glob("*.safetensors"))
    ranges = [r for f in files for r in file_mappings(f)]
    assert files and plain_tensors_inside(transformer, ranges) == []
