"""ACE-Step's original checkpoint layout: tiny models in it, strict conversion to the diffusers layout, the Engine
loading it through a conversion cache, and the `acestep-models` commands for it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.weights import original_layout as layout
from engine.weights.checkpoints import DEMO_MARKER, ModelNotFound, build_tiny_checkpoint, ensure_demo_models, is_complete
from engine.config import EngineConfig
from engine.weights.converted_cache import CACHE_DIR, SOURCE_RECORD, cache_path
from engine.weights.original_layout import ConversionError
from engine.request import GenerationRequest
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import BASE, TURBO


@pytest.fixture(scope="session")
def original_root(tmp_path_factory):
    """TURBO and BASE in the original layout, seed 0: the same weights as the diffusers-layout `engine` fixture."""
    root = tmp_path_factory.mktemp("original")
    for name in (TURBO, BASE):
        build_tiny_checkpoint(root / name, seed=0, model_name=name, layout="original")
    return root


def copy_root(original_root: Path, dst: Path) -> Path:
    """A private copy (file mtimes kept) that a test may change or convert into."""
    shutil.copytree(original_root, dst, ignore=shutil.ignore_patterns(".*"))
    return dst


def rewrite_weights(dit: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    file = dit / layout.SINGLE_WEIGHTS
    save_file(change(load_file(str(file))), str(file))


def request(**kw) -> GenerationRequest:
    fields = dict(prompt="lofi piano", lyrics="[verse] la la", audio_duration=10, inference_steps=2, seeds=[7],
                  audio_format="wav")
    fields.update(kw)
    return GenerationRequest(**fields)


def load_engine(checkpoint_dir: Path, names: list[str]):
    from engine.service import Engine

    # float32 as tests/engine_fixtures.py's engine, which these outputs are compared with byte for byte
    return Engine.load(EngineConfig(checkpoint_dir=str(checkpoint_dir), model_names=names, allow_download=False,
                                    dtype="float32"))


@pytest.fixture
def count_conversions(monkeypatch):
    """Names converted by engine.weights.convert.write_diffusers_layout during the test, in order."""
    from engine.weights import convert

    converted: list[str] = []
    real = convert.write_diffusers_layout

    def counting(root, name, out_dir):
        converted.append(name)
        return real(root, name, out_dir)

    monkeypatch.setattr(convert, "write_diffusers_layout", counting)
    return converted


# ---------------------------------------------------------------- the tiny original layout
def test_tiny_original_layout_has_the_published_files_and_names(original_root):
    import torch
    from safetensors.torch import load_file

    dit = original_root / TURBO
    config = json.loads((dit / layout.CONFIG_FILE).read_text())
    for key in ("hidden_size", "num_hidden_layers", "in_channels", "audio_acoustic_hidden_dim", "layer_types",
                "text_hidden_dim", "fsq_input_levels", "num_attention_pooler_hidden_layers", "is_turbo"):
        assert key in config, key
    assert config["is_turbo"] is True and config["model_version"] == "turbo"
    keys = set(load_file(str(dit / layout.SINGLE_WEIGHTS)))
    assert {k.split(".")[0] for k in keys} == {"decoder", "encoder", "tokenizer", "detokenizer", "null_condition_emb"}
    assert "decoder.proj_in.1.weight" in keys and "decoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(".to_q." in k or "proj_in_conv" in k for k in keys)
    silence = torch.load(str(dit / layout.SILENCE_LATENT), weights_only=True)
    assert tuple(silence.shape) == (1, 4, 15000) and silence.abs().sum() > 0  # [1, channels, frames], not zeros
    assert json.loads((dit / DEMO_MARKER).read_text())["random_weights"] is True
    assert (original_root / layout.VAE_DIR / "config.json").is_file()
    assert (original_root / layout.TEXT_ENCODER_DIR / "model.safetensors").is_file()
    assert (original_root / layout.TEXT_ENCODER_DIR / "tokenizer.json").is_file()
    assert not (dit / "model_index.json").exists()


def test_key_mapping_is_one_to_one_on_every_key(original_root):
    from safetensors.torch import load_file

    for key in load_file(str(original_root / TURBO / layout.SINGLE_WEIGHTS)):
        component, new = layout.diffusers_key(key)
        assert layout.original_key(component, new) == key
    assert layout.diffusers_key("decoder.proj_out.1.bias") == ("transformer", "proj_out_conv.bias")
    assert layout.diffusers_key("encoder.lyric_encoder.layers.0.self_attn.o_proj.weight") == (
        "condition_encoder", "lyric_encoder.layers.0.self_attn.to_out.0.weight")
    assert layout.diffusers_key("null_condition_emb") == ("condition_encoder", "null_condition_emb")
    assert layout.diffusers_key("lm_head.weight") is None


def test_component_configs_of_the_published_flat_configs():
    from engine import published_configs as published

    flat = dict(published.TRANSFORMER, text_hidden_dim=1024, timbre_hidden_dim=64, num_lyric_encoder_hidden_layers=8,
                num_timbre_encoder_hidden_layers=4, pool_window_size=5, fsq_dim=2048,
                fsq_input_levels=[8, 8, 8, 5, 5, 5], fsq_input_num_quantizers=1, num_attention_pooler_hidden_layers=2,
                is_turbo=True, model_version="turbo")
    configs = layout.component_configs(flat)
    expected = {"transformer": published.TRANSFORMER, "condition_encoder": published.CONDITION_ENCODER,
                "audio_tokenizer": published.AUDIO_TOKENIZER, "audio_token_detokenizer": published.AUDIO_DETOKENIZER}
    for component, values in expected.items():
        assert {k: configs[component][k] for k in values} == values, component
    assert configs["audio_tokenizer"]["layer_types"] == ["sliding_attention", "full_attention"]
    # XL: a condition encoder (and audio (de)tokenizer) narrower than the DiT
    xl = layout.component_configs(dict(flat, hidden_size=2560, encoder_hidden_size=2048))
    assert xl["transformer"]["hidden_size"] == 2560 and xl["transformer"]["encoder_hidden_size"] == 2048
    assert xl["condition_encoder"]["hidden_size"] == xl["audio_tokenizer"]["hidden_size"] == 2048
    with pytest.raises(ConversionError, match="'hidden_size'"):
        layout.component_configs({k: v for k, v in flat.items() if k != "hidden_size"})


# ---------------------------------------------------------------- conversion
def test_converted_model_makes_the_same_audio_bytes_as_the_diffusers_model(original_root, engine, tmp_path):
    from engine.weights.convert import convert_original

    dst = convert_original(original_root, TURBO, tmp_path / TURBO)
    assert is_complete(dst) and (dst / DEMO_MARKER).is_file()
    converted = load_engine(tmp_path, [TURBO])
    assert converted.models()[0].random_weights  # the demo marker came along
    ask = request()
    assert converted.generate(ask).audios[0].data == engine.generate(ask).audios[0].data


def test_sharded_weights_convert_to_the_same_files_as_one_file(original_root, tmp_path):
    import filecmp

    from engine.weights.convert import convert_original, export_original_layout
    from engine.weights.random_pipeline import build_random_pipeline

    sharded = tmp_path / "sharded"
    export_original_layout(build_random_pipeline(TURBO, seed=0), sharded, TURBO, shards=3)
    assert (sharded / TURBO / layout.SHARD_INDEX).is_file() and not (sharded / TURBO / layout.SINGLE_WEIGHTS).exists()
    a = convert_original(sharded, TURBO, tmp_path / "a" / TURBO)
    b = convert_original(original_root, TURBO, tmp_path / "b" / TURBO)
    files = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != DEMO_MARKER)
    assert files == sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def test_renamed_or_unknown_key_fails_naming_it(original_root, tmp_path):
    from engine.weights.convert import convert_original

    root = copy_root(original_root, tmp_path / "src")
    old, new = "decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.0.self_attn.query.weight"
    rewrite_weights(root / TURBO, lambda sd: {(new if k == old else k): v for k, v in sd.items()})
    with pytest.raises(ConversionError) as err:
        convert_original(root, TURBO, tmp_path / "out")
    assert f"unexpected key '{new}'" in str(err.value)
    assert f"missing key '{old}'" in str(err.value)
    assert not (tmp_path / "out").exists()

    rewrite_weights(root / TURBO, lambda sd: {(old if k == new else k): v for k, v in sd.items()} | {
        "mystery.weight": sd[new].clone()})
    with pytest.raises(ConversionError, match="belong to no pipeline component: 'mystery.weight'"):
        convert_original(root, TURBO, tmp_path / "out")


def test_wrong_shape_fails_naming_the_key_and_both_shapes(original_root, tmp_path):
    import torch

    from engine.weights.convert import convert_original

    root = copy_root(original_root, tmp_path / "src")
    key = "decoder.proj_in.1.weight"
    rewrite_weights(root / TURBO, lambda sd: dict(sd, **{key: torch.zeros(64, 13, 2)}))
    with pytest.raises(ConversionError) as err:
        convert_original(root, TURBO, tmp_path / "out")
    assert f"shape mismatch for '{key}'" in str(err.value)
    assert "checkpoint (64, 13, 2), config.json expects (64, 12, 2)" in str(err.value)

    root = copy_root(original_root, tmp_path / "src2")
    torch.save(torch.ones(1, 4, 100), str(root / TURBO / layout.SILENCE_LATENT))
    with pytest.raises(ConversionError, match=r"'silence_latent.pt'.*\(1, 100, 4\).*\(1, 15000, 4\)"):
        convert_original(root, TURBO, tmp_path / "out")


def test_interrupted_conversion_leaves_no_destination_and_keeps_the_old_one(original_root, tmp_path, monkeypatch):
    from engine.weights import convert

    def crash(self, out_dir, **kw):
        (Path(out_dir) / "model_index.json").write_text("{}")  # half-written
        raise RuntimeError("disk full")

    dst = tmp_path / "out" / TURBO
    monkeypatch.setattr(convert.AceStepPipeline, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert_original(original_root, TURBO, dst)
    assert not dst.exists()
    assert [p.name for p in dst.parent.iterdir()] == [f".{TURBO}.lock"]  # no temp folder left behind
    monkeypatch.undo()

    convert.convert_original(original_root, TURBO, dst)
    before = sorted(p.read_bytes() for p in dst.rglob("*") if p.is_file())
    monkeypatch.setattr(convert.AceStepPipeline, "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        convert.convert_original(original_root, TURBO, dst)  # a failed reconversion keeps the previous result
    assert sorted(p.read_bytes() for p in dst.rglob("*") if p.is_file()) == before


def test_a_killed_conversions_temp_folder_is_removed_next_time(original_root, tmp_path):
    from engine.weights.convert import convert_original

    dst = tmp_path / TURBO
    leftover = tmp_path / f".{TURBO}.tmp-new-deadbeef"  # what a killed process leaves
    (leftover / "transformer").mkdir(parents=True)
    convert_original(original_root, TURBO, dst)
    assert is_complete(dst) and not leftover.exists()


# ---------------------------------------------------------------- the Engine on an original-layout checkpoint dir
def test_engine_loads_original_layout_converting_once(original_root, engine, tmp_path, count_conversions):
    root = copy_root(original_root, tmp_path / "ck")
    first = load_engine(root, [TURBO, BASE])
    assert count_conversions == [TURBO, BASE]
    for name in (TURBO, BASE):
        cache = cache_path(root, name)
        assert cache == root / CACHE_DIR / name and is_complete(cache) and (cache / SOURCE_RECORD).is_file()
    infos = {m.name: m for m in first.models()}
    assert infos[TURBO].path == str(cache_path(root, TURBO)) and infos[BASE].random_weights
    assert infos[TURBO].task_types == ("text2music", "cover", "repaint")  # turbo-ness survives the conversion
    # component sharing by content still works across converted models
    assert first.describe()["shared_components"]["vae"] == [TURBO, BASE]
    assert first.model(TURBO).pipe.text_encoder is first.model(BASE).pipe.text_encoder
    ask = request(model=BASE, guidance_scale=3.0)
    assert first.generate(ask).audios[0].data == engine.generate(ask).audios[0].data

    load_engine(root, [TURBO, BASE])
    assert count_conversions == [TURBO, BASE]  # second load: straight from the cache

    (root / TURBO / "README.md").write_text("not read by the conversion\n")
    load_engine(root, [TURBO])
    assert count_conversions == [TURBO, BASE]  # files the conversion does not read do not invalidate it

    later = os.stat(root / TURBO / layout.CONFIG_FILE).st_mtime_ns + 10**9
    os.utime(root / TURBO / layout.CONFIG_FILE, ns=(later, later))  # a source file changed
    load_engine(root, [TURBO, BASE])
    assert count_conversions == [TURBO, BASE, TURBO]


def test_incomplete_original_layout_is_named_not_replaced_by_a_demo(original_root, tmp_path, monkeypatch):
    from engine.weights.checkpoints import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = copy_root(original_root, tmp_path / "ck")
    shutil.rmtree(root / layout.VAE_DIR)
    config = EngineConfig(checkpoint_dir=str(root), model_names=[TURBO])
    with pytest.raises(ModelNotFound, match=f"original layout but incomplete; missing: {root / 'vae'}/"):
        resolve_model(config, TURBO)
    ensure_demo_models(config)  # must not write a demo model into the original DiT folder
    assert not (root / TURBO / "model_index.json").exists()


# ---------------------------------------------------------------- acestep-models
def test_models_cli_make_tiny_original_convert_and_list(tmp_path, capsys, monkeypatch):
    from entrypoints.models import main

    monkeypatch.chdir(tmp_path)  # `list` loads ./.env into os.environ for good: none in a fresh folder
    monkeypatch.setenv("ACESTEP_CONFIG_PATH", TURBO)
    src, out = tmp_path / "src", tmp_path / "out"
    assert main(["make-tiny", str(src), "--name", TURBO, "--layout", "original"]) == 0
    assert (src / TURBO / layout.CONFIG_FILE).is_file() and (src / layout.VAE_DIR).is_dir()
    assert main(["list", "--checkpoint-dir", str(src)]) == 0
    listed = capsys.readouterr().out
    assert TURBO in listed and "original layout (converted on first load" in listed and "DEMO" in listed
    assert "vae" not in listed.replace(f"{CACHE_DIR}", "")  # the shared folders are not models

    assert main(["convert", str(src), str(out / TURBO)]) == 0  # the only DiT under SRC
    assert is_complete(out / TURBO)
    assert main(["convert", str(src), str(out / TURBO)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(src / TURBO), str(out / TURBO), "--overwrite"]) == 0  # SRC = the DiT folder
    assert main(["convert", str(src), str(out / "x"), "--name", BASE]) == 1
    assert "incomplete" in capsys.readouterr().err
