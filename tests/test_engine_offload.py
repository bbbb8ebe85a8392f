"""Offload for small GPUs (engine/offload.py): the auto decision from the fit check's
numbers, and the tiny engine run with offload forced where the "accelerator" is the CPU -- every module's place
recorded by forward pre-hooks as it starts, and the audio bit-identical to a run without offload."""
from __future__ import annotations

import numpy as np
import pytest

from engine.offload import (GB, Decision, decide, decode_on_cpu, fit_bytes, largest_stage, load_on_device,
                            parse_mode)
from tests.engine_fixtures import TURBO, tiny_checkpoint_dir  # noqa: F401  (session fixture)

# 2B turbo in bf16 with the 1.7B LM, roughly: text encoder 1.2, LM 3.4, DiT (+ condition encoder) 4.8, VAE 0.3 GB
SIZES = {"text_encoder": int(1.2 * GB), "lm": int(3.4 * GB), "dit": int(4.8 * GB), "vae": int(0.3 * GB)}
TOTAL = sum(SIZES.values())
WORK = 1 * GB


def test_auto_offloads_only_when_all_do_not_fit_but_the_largest_does():
    largest = largest_stage(SIZES)
    assert largest == SIZES["dit"]
    assert largest_stage({**SIZES, "resident": 10}) == SIZES["dit"] + 10  # the tokenizers stay on the device
    on_16 = decide("auto", TOTAL, largest, 16 * GB, WORK)
    assert on_16 == Decision(False, on_16.reason, TOTAL) and on_16.reason.startswith("auto: off (all 9.7 GB")
    on_8 = decide("auto", TOTAL, largest, 8 * GB, WORK)
    assert on_8.offload and on_8.needed == largest
    assert on_8.reason == ("auto: on (9.7 GB of weights + 1.0 GB do not fit in 8.0 GB; the largest module, "
                           "4.8 GB, does)")
    assert not decide("auto", TOTAL, largest, 5 * GB, WORK).offload  # not even the DiT + working memory
    assert not decide("auto", TOTAL, largest, 8 * GB, WORK, device_type="cpu").offload
    assert not decide("auto", TOTAL, largest, None, WORK).offload
    assert decide("modules", TOTAL, largest, 64 * GB, WORK).offload
    assert not decide("none", TOTAL, largest, 1 * GB, WORK).offload
    # while loading, the fit check asks for the largest stage only where offload may follow, and never on CPU
    assert fit_bytes("auto", TOTAL, largest) == fit_bytes("modules", TOTAL, largest) == largest
    assert fit_bytes("none", TOTAL, largest) == fit_bytes("auto", TOTAL, largest, "cpu") == TOTAL
    # loading: straight to the device while all still fits (auto), never when offload is forced
    assert load_on_device("auto", 6 * GB, WORK, 8 * GB) and not load_on_device("auto", 8 * GB, WORK, 8 * GB)
    assert load_on_device("none", TOTAL, WORK, 1 * GB) and not load_on_device("modules", 1, WORK, 64 * GB)


def test_the_decode_falls_back_to_the_cpu_when_its_working_set_would_not_fit():
    assert decode_on_cpu(3 * GB, 2 * GB)
    assert not decode_on_cpu(1 * GB, 2 * GB)
    assert not decode_on_cpu(3 * GB, None)
    assert parse_mode(" Modules ") == "modules"
    with pytest.raises(ValueError, match="ACESTEP_OFFLOAD='gpu': use one of none, auto, modules"):
        parse_mode("gpu")


def test_the_engine_with_offload_forced_runs_each_stage_alone_and_sounds_the_same(tiny_checkpoint_dir):  # noqa: F811
    import torch

    from engine import offload
    from engine.config import EngineConfig
    from engine.request import GenerationRequest
    from engine.service import Engine

    request = GenerationRequest(prompt="offload", lyrics="[instrumental]", audio_duration=10.0, inference_steps=2,
                                seeds=[5], audio_format="wav")
    engine = Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO],
                                      allow_download=False, device="cpu", dtype="float32", offload="modules",
                                      warmup="false"))
    offloader = engine.offloader
    assert offloader is not None and engine.describe()["offload"]["active"]
    assert set(offloader.placement.values()) == {"home"}  # everything waits on the CPU after loading
    pipe = engine.model(TURBO).pipe
    keys = offload.pipeline_groups(TURBO)
    seen: list[tuple[str, dict[str, str]]] = []
    handles = []
    for stage, module in (("text_encoder", pipe.text_encoder), ("dit", pipe.condition_encoder),
                          ("dit", pipe.transformer), ("vae", pipe.vae.decoder)):
        def record(mod, _args, stage=stage):
            placement = dict(offloader.placement)
            assert next(mod.parameters()).device == offloader.device  # the running module computes on the target
            seen.append((stage, placement))
        handles.append(module.register_forward_pre_hook(record))  # after the offloader's own: sees its moves
    try:
        got = engine.generate(request, encode=False)
    finally:
        for handle in handles:
            handle.remove()
    stages = [stage for stage, _ in seen]
    assert stages[0] == "text_encoder" and stages[-1] == "vae" and "dit" in stages
    for stage, placement in seen:  # only the running stage is on the device, every other one at home
        assert placement == {k: ("device" if k == keys[stage] else "home") for k in keys.values()}, (stage, placement)
    info = got.generation_info
    assert info["offload"] == {"mode": "modules", "active": True, "reason": "set: modules (ACESTEP_OFFLOAD)"}
    assert offloader.moves >= 6

    # the same engine without offload: hooks gone, everything resident
    offloader.remove()
    engine._apply_offload(Decision(False, "set: none (ACESTEP_OFFLOAD)", 0))
    engine.offloader = None
    expected = engine.generate(request, encode=False)
    assert expected.generation_info["offload"]["active"] is False
    assert torch.equal(torch.from_numpy(got.pending[0].samples), torch.from_numpy(expected.pending[0].samples))
    assert np.abs(got.pending[0].samples).max() > 0
