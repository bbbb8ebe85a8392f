"""How the diffusion loop integrates the DiT's velocity: upstream's `sampler_mode` (euler / heun) and its
velocity controls (`velocity_norm_threshold`, `velocity_ema_factor`), as schedulers for AceStepPipeline.

The pipeline evaluates the DiT once per entry of `scheduler.timesteps` and hands the (guided) velocity
with the current latents to `scheduler.step`, so a scheduler decides both how many evaluations a step takes
and what becomes of each velocity. Upstream's rules (its turbo and base `generate_audio` loops):
- Heun: predict with an Euler step, evaluate the DiT again at the predicted point and the next time, step
  with the mean of the two velocities. A turbo model's last step only projects to x0 (one evaluation);
  a base/sft model corrects its last step too (at t = 0). So `n` steps cost 2n-1 or 2n evaluations.
- Norm clamp: each item's velocity is scaled down to at most `threshold` times the norm of the latents
  it was predicted from.
- EMA: a step's velocity is blended with the previous step's final one; a Heun corrector is blended with
  its own step's predictor.
Heun with classifier-free guidance is not offered: upstream guides its corrector with plain CFG while
the pipeline applies APG (and moves its momentum) at every evaluation.

Source: ace-step/ACE-Step-1.5 at 14bd1db, `AceStepConditionGenerationModel.generate_audio`.
- acestep/models/turbo/modeling_acestep_v15_turbo.py: the loop runs over `t_schedule` (no trailing 0);
  after the clamp and the EMA, `if step_idx == num_steps - 1: xt = self.get_x0_from_noise(xt, vt, t);
  break` comes before the `elif use_heun` branch, so the last step has no corrector. The same in
  xl_turbo/modeling_acestep_v15_xl_turbo.py (3450c05) and upstream's MLX loop
  acestep/models/mlx/dit_generate.py ("Final step: compute x0").
- acestep/models/base/modeling_acestep_v15_base.py (sft/ holds the same loop): `zip(t[:-1], t[1:])` over
  a shifted `linspace(1, 0, steps + 1)`, so the last interval ends at 0 and the `use_heun` branch
  evaluates its corrector there (t_prev = 0).
- Both: the corrector's velocity is clamped against `xt_predicted`, blended with its step's `vt`
  (`vt2 = (1 - f) * vt2 + f * vt`), averaged with it, and the average becomes `prev_vt`.
A third-party MLX port corrects a turbo model's last interval too, assuming every upstream loop zips over a
schedule ending at 0; only the base/sft loop does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

SAMPLER_MODES = ("euler", "heun")


@dataclass(frozen=True)
class VelocityShaping:
    norm_threshold: float = 0.0  # 0: off
    ema_factor: float = 0.0  # 0: off

    def apply(self, velocity: torch.Tensor, latents: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        v = velocity
        if self.norm_threshold > 0.0:
            dims = tuple(range(1, v.dim()))
            v_norm = torch.linalg.vector_norm(v.float(), dim=dims, keepdim=True)
            x_norm = torch.linalg.vector_norm(latents.float(), dim=dims, keepdim=True) + 1e-10
            v = v * torch.clamp(self.norm_threshold * x_norm / (v_norm + 1e-10), max=1.0).to(v.dtype)
        if self.ema_factor > 0.0 and previous is not None:
            v = (1.0 - self.ema_factor) * v + self.ema_factor * previous.to(v.dtype)
        return v


def evaluations(steps: int, sampler_mode: str, final_corrector: bool) -> list[int]:
    """The 1-based step each DiT evaluation of the loop belongs to (its length: the evaluations a run makes)."""
    out: list[int] = []
    for step in range(1, steps + 1):
        out.append(step)
        if sampler_mode == "heun" and (step < steps or final_corrector):
            out.append(step)
    return out


class ShapedEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """The pipeline's Euler step, with the velocity controls applied first (a no-op at their defaults)."""

    shaping = VelocityShaping()
    _previous: Optional[torch.Tensor] = None

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._previous = None

    def step(self, model_output, timestep, sample, *args, **kwargs):
        velocity = self.shaping.apply(model_output, sample, self._previous)
        self._previous = velocity
        return super().step(velocity, timestep, sample, *args, **kwargs)


class HeunScheduler(ShapedEulerScheduler):
    """Second-order (predictor-corrector) flow-matching steps; see the module's notes for upstream's rules."""

    final_corrector = False  # True for base/sft models

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)  # self.sigmas: the schedule plus the terminal 0
        sigmas = [float(s) for s in self.sigmas]
        steps = len(sigmas) - 1
        plan: list[tuple[bool, float, float]] = []  # (corrector?, sigma of the step, sigma after it)
        for i in range(steps):
            plan.append((False, sigmas[i], sigmas[i + 1]))
            if i < steps - 1 or self.final_corrector:
                plan.append((True, sigmas[i], sigmas[i + 1]))
        at = [s_next if corrector else s for corrector, s, s_next in plan]
        self.timesteps = torch.tensor(at, dtype=torch.float32, device=self.timesteps.device) \
            * self.config.num_train_timesteps
        self._plan, self._calls, self._pending = plan, 0, None

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        corrector, sigma, sigma_next = self._plan[self._calls]
        self._calls += 1
        dt = sigma_next - sigma
        if not corrector:
            velocity = self.shaping.apply(model_output, sample, self._previous)
            start = sample.float()
            if self._calls < len(self._plan) and self._plan[self._calls][0]:
                self._pending = (start, velocity)
            else:
                self._previous = velocity
        else:
            start, first = self._pending
            second = self.shaping.apply(model_output, sample, first)
            velocity = 0.5 * (first + second)
            self._previous, self._pending = velocity, None
        prev_sample = (start + velocity.float() * dt).to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def scheduler_for(original: FlowMatchEulerDiscreteScheduler, sampler_mode: str, shaping: VelocityShaping,
                  final_corrector: bool) -> FlowMatchEulerDiscreteScheduler:
    """An ODE scheduler for one pipeline call, from the pipeline's own config."""
    kind = HeunScheduler if sampler_mode == "heun" else ShapedEulerScheduler
    scheduler = kind.from_config(original.config)
    scheduler.shaping = shaping
    if isinstance(scheduler, HeunScheduler):
        scheduler.final_corrector = final_corrector
    return scheduler
