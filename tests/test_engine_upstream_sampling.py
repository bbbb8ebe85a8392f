"""Upstream's sampler fields (sampler_mode, cover_noise_strength, velocity_*, latent_*): each reaches the
engine from /release_task, changes the output as upstream's generate_audio does, and shows in
generation_info; values this engine cannot honour are a 400 (or a failed task saying why)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine import audio_io, plan, sampler
from engine import service
from engine.request import GenerationRequest
from engine.types import GenerationError
from handlers.envelope import ApiError
from handlers.request_parsing import parse_release_task
from tests.engine_fixtures import *  # noqa: F401,F403
from tests.engine_fixtures import BASE, TURBO, decode, wav_bytes


def req(**kw) -> GenerationRequest:
    base = dict(prompt="lofi piano", lyrics="[verse] la la", audio_duration=10, batch_size=1, audio_format="wav",
                seeds=[5], inference_steps=2)
    base.update(kw)
    return GenerationRequest(**base)


def samples(result) -> np.ndarray:
    return decode(result.audios[0].data)[0]


def _detail(fields) -> str:
    with pytest.raises(ApiError) as info:
        parse_release_task(fields)
    assert info.value.status_code == 400
    return info.value.detail


def _run(engine, request: GenerationRequest, **kwargs):
    """(the DiT's forward calls, the result, the latents the VAE decoded [batch, frames, channels]) of one
    generation on the turbo model."""
    pipe = engine.model(TURBO).pipe
    calls, decoded = [], []
    hooks = [pipe.transformer.register_forward_hook(lambda *_: calls.append(1)),
             pipe.vae.decoder.register_forward_pre_hook(lambda _m, a: decoded.append(a[0].transpose(1, 2).clone()))]
    try:
        result = engine.generate(request, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(decoded) == 1  # one untiled decode
    return len(calls), result, decoded[0]


@pytest.fixture(scope="module")
def default_run(engine):
    """The run every field's is compared with: req() at upstream's defaults (2 Euler steps)."""
    return _run(engine, req())


# --- the step rules, against upstream's loop written out (a toy velocity field instead of the DiT) ----------

def _velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sin(3.0 * x) * (1.0 + t) - 0.5 * x


def _upstream_loop(x, schedule, heun: bool, final_corrector: bool, norm: float = 0.0, ema: float = 0.0):
    """Upstream generate_audio's ODE loop (turbo: the last step projects to x0; base: every step corrects).

    Checked against ace-step/ACE-Step-1.5 at 14bd1db (not against engine/sampler.py):
    acestep/models/turbo/modeling_acestep_v15_turbo.py (`if step_idx == num_steps - 1:` ... `get_x0_from_noise`,
    `break` before the Heun branch: `final_corrector=False`) and acestep/models/base/modeling_acestep_v15_base.py
    (`zip(t[:-1], t[1:])` over a schedule ending at 0, the corrector on every interval: `final_corrector=True`).
    Both clamp then EMA-blend `vt`; the corrector's `vt2` is clamped against `xt_predicted` and blended with `vt`.
    The turbo projection `xt - vt * t` is the Euler step to t = 0 written here.
    """
    def shape(v, at, prev):
        if norm > 0:
            v = v * torch.clamp(norm * (at.norm(dim=(1, 2), keepdim=True) + 1e-10)
                                / (v.norm(dim=(1, 2), keepdim=True) + 1e-10), max=1.0)
        return (1 - ema) * v + ema * prev if ema > 0 and prev is not None else v

    prev = None
    times = list(schedule) + [0.0]
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = shape(_velocity(x, t), x, prev)
        dt = t - t_next
        if heun and (i < len(schedule) - 1 or final_corrector):
            predicted = x - v * dt
            v2 = shape(_velocity(predicted, t_next), predicted, v)
            v = 0.5 * (v + v2)
        x = x - v * dt
        prev = v
    return x


def _pipeline_loop(scheduler, x, schedule):
    """What AceStepPipeline does with its scheduler: one evaluation per timestep, then scheduler.step."""
    scheduler.set_timesteps(sigmas=list(schedule))
    evaluations = 0
    for t in scheduler.timesteps:
        x = scheduler.step(_velocity(x, float(t)), t, x, return_dict=False)[0]
        evaluations += 1
    return x, evaluations


SCHEDULE = [1.0, 0.9, 0.75, 0.5, 0.3]


def _toy_start() -> torch.Tensor:
    return torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("final_corrector", [False, True], ids=["turbo", "base"])
def test_heun_steps_are_upstreams_predictor_corrector(final_corrector):
    original = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    x = _toy_start()
    heun = sampler.scheduler_for(original, "heun", sampler.VelocityShaping(), final_corrector=final_corrector)
    got, evaluations = _pipeline_loop(heun, x, SCHEDULE)
    assert evaluations == len(SCHEDULE) * 2 - (0 if final_corrector else 1)
    assert evaluations == len(sampler.evaluations(len(SCHEDULE), "heun", final_corrector))
    assert torch.allclose(got, _upstream_loop(x, SCHEDULE, True, final_corrector), atol=1e-5)
    euler, euler_evals = _pipeline_loop(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0), x, SCHEDULE)
    assert euler_evals == len(SCHEDULE) and torch.allclose(euler, _upstream_loop(x, SCHEDULE, False, False), atol=1e-5)
    assert not torch.allclose(got, euler, atol=1e-3)


@pytest.mark.parametrize("mode,final_corrector", [("euler", False), ("heun", False), ("heun", True)])
@pytest.mark.parametrize("norm,ema", [(0.3, 0.0), (0.0, 0.4), (0.3, 0.4)])
def test_velocity_controls_are_upstreams(mode, final_corrector, norm, ema):
    original = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    x = _toy_start()
    shaped = sampler.scheduler_for(original, mode, sampler.VelocityShaping(norm, ema), final_corrector)
    got, _ = _pipeline_loop(shaped, x, SCHEDULE)
    heun = mode == "heun"
    assert torch.allclose(got, _upstream_loop(x, SCHEDULE, heun, final_corrector, norm, ema), atol=1e-5)
    assert not torch.allclose(got, _upstream_loop(x, SCHEDULE, heun, final_corrector), atol=1e-3)


# --- sampler_mode ---------------------------------------------------------------------------------------

def test_sampler_mode_is_read_and_refused_outside_euler_and_heun():
    assert parse_release_task({"sampler_mode": "Heun"}).request.sampler_mode == "heun"
    assert parse_release_task({"param_obj": {"sampler_mode": "euler"}}).request.sampler_mode == "euler"
    assert _detail({"sampler_mode": "rk4"}) == "sampler_mode: must be one of euler, heun (got 'rk4')"


def test_heun_evaluates_the_dit_twice_a_step_and_changes_the_output(engine, default_run):
    euler_calls, euler, _ = default_run
    seen = []
    heun_calls, heun, _ = _run(engine, req(sampler_mode="heun"), progress=lambda f, s: seen.append(s))
    assert (euler_calls, heun_calls) == (2, 3)  # turbo: the last step only projects to x0, as upstream
    assert not np.allclose(samples(euler), samples(heun), atol=1e-3)
    assert (euler.generation_info["sampler_mode"], heun.generation_info["sampler_mode"]) == ("euler", "heun")
    assert [s for s in seen if s.startswith("diffusion")] == [f"diffusion step {i}/2" for i in (1, 1, 2)]
    assert type(engine.model(TURBO).pipe.scheduler) is FlowMatchEulerDiscreteScheduler  # restored after the call
    assert plan.batch_key(req(sampler_mode="heun"), TURBO) != plan.batch_key(req(), TURBO)


def test_heun_with_guidance_fails_saying_why_and_sde_keeps_euler(engine):
    with pytest.raises(GenerationError, match="heun.*guidance.*plain CFG"):
        engine.generate(req(model=BASE, sampler_mode="heun", guidance_scale=5.0))
    assert service._sampler_mode(req(sampler_mode="heun", infer_method="sde")) == "euler"  # as upstream


# --- velocity_norm_threshold, velocity_ema_factor --------------------------------------------------------

def test_velocity_fields_are_read_and_bounded():
    parsed = parse_release_task({"velocity_norm_threshold": "2", "param_obj": {"velocity_ema_factor": 0.1}}).request
    assert (parsed.velocity_norm_threshold, parsed.velocity_ema_factor) == (2.0, 0.1)
    assert _detail({"velocity_ema_factor": 1.5}).startswith("velocity_ema_factor: must be")
    assert _detail({"velocity_norm_threshold": -1}).startswith("velocity_norm_threshold: must be")


def test_velocity_controls_change_the_run(engine, default_run):
    _, plain, _ = default_run
    _, shaped, _ = _run(engine, req(velocity_norm_threshold=0.05, velocity_ema_factor=0.5))
    assert not np.allclose(samples(plain), samples(shaped), atol=1e-3)
    info = shaped.generation_info
    assert (info["velocity_norm_threshold"], info["velocity_ema_factor"]) == (0.05, 0.5)
    assert plan.batch_key(req(velocity_ema_factor=0.5), TURBO) != plan.batch_key(req(), TURBO)


# --- cover_noise_strength -------------------------------------------------------------------------------

def test_cover_noise_strength_is_read_for_covers_and_refused_elsewhere():
    cover = {"task_type": "cover", "src_audio_key": "uploads/x"}
    assert parse_release_task({**cover, "coverNoiseStrength": "0.4"}).request.cover_noise_strength == 0.4
    assert parse_release_task({"audio_code_string": "1,2,3", "cover_noise_strength": 1}).request.cover_noise_strength == 1
    assert _detail({**cover, "cover_noise_strength": 1.5}).startswith("cover_noise_strength: must be")
    detail = _detail({"cover_noise_strength": 0.5})
    assert "cover_noise_strength applies to cover only" in detail and "'text2music'" in detail, detail


def test_cover_noise_strength_starts_from_the_source_renoised(engine):
    source_wav = wav_bytes(4.0)  # short: the test runs two covers
    pipe = engine.model(TURBO).pipe
    first_inputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: None if first_inputs else first_inputs.append(kw["hidden_states"].clone()), with_kwargs=True)
    runs = {}
    try:
        for strength in (0.0, 1.0):
            first_inputs.clear()
            calls, result, out = _run(engine, req(task_type="cover", src_audio_key="k", audio_duration=None, seeds=[3],
                                                  inference_steps=4, cover_noise_strength=strength), src_audio=source_wav)
            runs[strength] = (calls, first_inputs[0], out, result.generation_info)
    finally:
        hook.remove()
    # the schedule for 4 steps at shift 3 is 1, 0.9, 0.75, 0.5: strength 1 (noise level 0) starts at 0.5, one step
    (calls0, start0, out0, info0), (calls1, start1, out1, info1) = runs[0.0], runs[1.0]
    assert (calls0, calls1) == (4, 1) and (info0["steps"], info1["steps"]) == (4, 1)
    assert info1["cover_noise_strength"] == 1.0 and any("started at t=0.5" in n for n in info1["notes"])
    noise = torch.randn(tuple(start0.shape), generator=torch.Generator().manual_seed(3))
    assert torch.equal(start0, noise)  # strength 0: pure noise, as before
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)  # the engine fixes the draw from the VAE's posterior (the pipeline's encode makes the same)
        clean = pipe.vae.encode(audio_io.decode_audio(source_wav, "src").unsqueeze(0)).latent_dist.sample()
    clean = clean.transpose(1, 2)
    assert torch.allclose(start1, 0.5 * noise + 0.5 * clean, atol=1e-5)
    distance = {s: float((out - clean).norm() / clean.norm()) for s, out in ((0.0, out0), (1.0, out1))}
    assert distance[1.0] < distance[0.0], distance  # the output stays closer to the source latents


# --- latent_shift, latent_rescale -----------------------------------------------------------------------

def test_latent_fields_are_read_and_bounded():
    parsed = parse_release_task({"latent_shift": "-0.1", "metas": {"latent_rescale": 1.2}}).request
    assert (parsed.latent_shift, parsed.latent_rescale) == (-0.1, 1.2)
    assert _detail({"latent_rescale": 11}).startswith("latent_rescale: must be greater than 0 and at most 10")
    assert _detail({"latent_rescale": 0}).endswith("(got 0)")  # a constant latent would decode to silence


def test_latents_are_rescaled_and_shifted_before_the_decode(engine, default_run):
    _, plain, plain_latents = default_run
    _, moved, latents = _run(engine, req(latent_shift=0.1, latent_rescale=0.5))
    assert torch.allclose(latents, plain_latents * 0.5 + 0.1, atol=1e-5)  # upstream: pred * rescale + shift
    assert not np.allclose(samples(plain), samples(moved), atol=1e-3)
    assert (moved.generation_info["latent_shift"], moved.generation_info["latent_rescale"]) == (0.1, 0.5)
    assert plan.batch_key(req(latent_shift=0.1), TURBO) != plan.batch_key(req(), TURBO)
