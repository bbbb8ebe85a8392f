"""The CPU as a target (issue 25): dtype chosen from the CPU's features, OpenMP threads that sleep, VAE weight norm
folded. The CPU's features are injected: these tests say the same on any machine."""
from __future__ import annotations

import pytest
import torch

from engine import cpu_target
from engine.config import EngineConfig
from engine.request import GenerationRequest
from engine.service import choose_dtype
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import TURBO

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, dtype, feature", [
    ({"avx2", "amx_bf16", "amx_tile", "avx512_bf16"}, torch.bfloat16, "AMX-BF16"),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "AVX512-BF16"),
    ({"fp", "asimd", "bf16"}, torch.bfloat16, "Arm BF16"),
    ({"avx2", "avx512f"}, torch.float32, None),  # bf16 would be emulated: slower than float32
    (set(), torch.float32, None),
])
def test_auto_dtype_on_cpu_follows_native_bf16(flags, dtype, feature):
    chosen, why = choose_dtype("auto", CPU, flags)
    assert chosen == dtype
    assert (feature in why) if feature else ("float32" in why and "emulated" in why)


def test_a_set_dtype_wins_over_the_cpu():
    assert choose_dtype("float32", CPU, {"amx_bf16"}) == (torch.float32, "set: float32 (ACESTEP_DTYPE)")
    assert choose_dtype("bf16", CPU, set())[0] == torch.bfloat16


@pytest.mark.parametrize("capability, emulates, dtype", [((7, 5), True, torch.bfloat16), ((8, 0), True, torch.bfloat16),
                                                         ((8, 9), True, torch.bfloat16),
                                                         ((6, 1), False, torch.float32)])
def test_auto_dtype_on_cuda_is_bf16_even_where_emulated_never_float16(monkeypatch, capability, emulates, dtype):
    """The CUDA device faked at its properties, so torch's own is_bf16_supported runs. A T4 (7.5) has no native
    bf16 and gets torch's emulated bf16 (slower, the same memory), not float16: float16 overflows in the DiT and
    gives NaN latents for every song with lyrics on pre-Ampere GPUs (upstream ACE-Step-1.5 #1243, #1274), which
    check_finite would fail; float32 would double the weights a 16 GB T4 must hold. float32 only where not even
    emulated bf16 works. The DiT's and the transformers LM's auto choices are one."""
    from types import SimpleNamespace

    from engine.lm.transformers_backend import default_dtype

    major, minor = capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(major=major, minor=minor))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates)
    cuda = torch.device("cuda")
    chosen, why = choose_dtype("auto", cuda)
    assert chosen == dtype == default_dtype(cuda) and why == f"auto: {str(dtype)[6:]} on CUDA"
    assert choose_dtype("float16", cuda) == (torch.float16, "set: float16 (ACESTEP_DTYPE)")  # only when asked


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_target.cpu_flags(str(x86)) == {"fpu", "avx512f", "amx_bf16", "avx512_bf16"}
    assert cpu_target.native_bf16(cpu_target.cpu_flags(str(arm))) == "Arm BF16"
    assert cpu_target.cpu_flags(str(tmp_path / "missing")) is None
    assert cpu_target.auto_cpu_dtype(None)[0] == "float32"  # nothing to go by: the safe choice


def test_the_omp_wait_policy_is_passive_unless_the_user_chose():
    env: dict[str, str] = {}
    assert cpu_target.passive_omp_wait_policy(env) is True and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_target.passive_omp_wait_policy(env) is False and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_auto_on_a_bf16_cpu_loads_and_generates_in_bf16_and_says_so(tiny_checkpoint_dir, monkeypatch):
    from engine.service import Engine

    monkeypatch.setattr(cpu_target, "cpu_flags", lambda *a: {"avx512f", "amx_bf16"})
    eng = Engine.load(EngineConfig(checkpoint_dir=str(tiny_checkpoint_dir), model_names=[TURBO],
                                   allow_download=False, device="cpu"))
    assert eng.model(None).pipe.transformer.dtype == torch.bfloat16
    assert eng.model(None).pipe.vae.dtype == torch.bfloat16
    info = eng.generate(GenerationRequest(prompt="lofi", lyrics="[verse] la", audio_duration=10, inference_steps=1,
                                          audio_format="wav")).generation_info
    assert info["dtype"] == "bfloat16" and "AMX-BF16" in info["dtype_choice"]
    assert eng.describe()["dtype_choice"] == info["dtype_choice"]


def test_the_worker_entry_point_sets_it(tmp_path, monkeypatch):
    import sys

    from entrypoints import worker

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # restored after the test
    with pytest.raises(SystemExit):
        worker.main(["--healthcheck", "--heartbeat-file", str(tmp_path / "none.json"), "--data-dir", str(tmp_path)])
    assert worker.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
