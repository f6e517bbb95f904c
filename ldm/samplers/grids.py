"""The two time grids the samplers walk, each with how it starts from noise and how it noises an image.

- :data:`TIMESTEPS`: CompVis' DDIM timesteps, ``range(0, 1000, 1000 // steps) + 1`` descending then a final
  level 0 (:meth:`ldm.samplers.schedule.DiffusionSchedule.ddim_levels`). The latent is in the DDPM form
  ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``; txt2img starts from ``x_T = noise`` as CompVis does.
- :data:`TIME_UNIFORM`: ``N + 1`` timesteps evenly spaced from 999 to 0, fractional ones included, ``N`` the number
  of CompVis' DDIM timesteps for ``steps`` (``len(range(0, 1000, 1000 // steps))``): the webui's UniPC grid
  (its ``skip_type="time_uniform"`` from ``T = 1`` to ``t_0 = 1 / 1000``). Same latent form as ``TIMESTEPS``;
  ``alpha_bar`` interpolates in log between integer timesteps.
- :data:`SIGMAS`: the levels of a schedule type (:mod:`ldm.samplers.schedules`; ``uniform`` is k-diffusion's
  ``get_sigmas(steps)``, ``steps`` timesteps evenly spaced from 999 to 0, then sigma 0). The latent is
  ``x = x0 + sigma * eps`` (Karras et al. 2022); txt2img starts from ``sigma_max * noise``.
- :data:`SIGMAS_WITHOUT_PENULTIMATE`: the schedule's levels for ``steps + 1`` with the next-to-last dropped,
  ``steps`` steps again: AUTOMATIC1111's grid for DPM2 and DPM2 a (``discard_next_to_last_sigma``), whose
  second-order step would otherwise spend a model call on the tiny next-to-last interval.
- :data:`LCM_TIMESTEPS`: diffusers' ``LCMScheduler`` timesteps (its ``from_config`` of SD v1's scheduler: 50
  original steps): of the distillation's timesteps ``20 k - 1`` (k = 1..50), descending, ``steps`` taken at
  indices ``floor(linspace(0, 50, steps, endpoint=False))`` (999, 759, 499, 259 for 4), then level 0. Same
  latent form as ``TIMESTEPS``.

The timestep grids ignore the schedule type, as the webui's DDIM, PLMS and UniPC do.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldm.samplers.schedule import DiffusionSchedule
from ldm.samplers.schedules import schedule_levels


class TimestepGrid:
    """Integer DDPM timesteps (the ``ddim`` and ``plms`` samplers)."""

    name = "timesteps"

    def levels(self, schedule: DiffusionSchedule, steps: int, schedule_type: str = "uniform") -> list[float]:
        return schedule.ddim_levels(steps)

    def start(self, noise: Tensor, level: float) -> Tensor:
        return noise

    def noised(self, schedule: DiffusionSchedule, x0: Tensor, noise: Tensor, level: float) -> Tensor:
        a = schedule.alpha_bar(level)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


class TimeUniformGrid(TimestepGrid):
    """The webui's UniPC walk: ``N + 1`` timesteps evenly spaced from ``T - 1`` to 0 (fractional), ``N`` the
    length of the webui's DDIM timesteps, ``len(range(0, T, T // steps))`` (``steps`` where it divides ``T``)."""

    name = "time-uniform timesteps"

    def levels(self, schedule: DiffusionSchedule, steps: int, schedule_type: str = "uniform") -> list[float]:
        total = schedule.num_timesteps
        if not 1 <= steps <= total:
            raise ValueError(f"steps must be between 1 and {total}, got {steps}")
        n = len(range(0, total, total // steps))
        return [(total - 1) * (n - k) / n for k in range(n + 1)]


class LcmTimestepGrid(TimestepGrid):
    """The latent consistency model's timesteps (``LCMScheduler.set_timesteps`` with ``original_inference_steps``)."""

    name = "LCM timesteps"
    original_steps = 50

    def levels(self, schedule: DiffusionSchedule, steps: int, schedule_type: str = "uniform") -> list[float]:
        if not 1 <= steps <= self.original_steps:
            raise ValueError(f"the lcm sampler takes 1 to {self.original_steps} steps, got {steps}")
        k = schedule.num_timesteps // self.original_steps
        origin = [k * i - 1 for i in range(self.original_steps, 0, -1)]
        return [origin[math.floor(j * self.original_steps / steps)] for j in range(steps)] + [0]


class SigmaGrid:
    """A schedule type's noise levels (every other sampler)."""

    name = "sigmas"

    def levels(self, schedule: DiffusionSchedule, steps: int, schedule_type: str = "uniform") -> list[float]:
        return schedule_levels(schedule_type, schedule, steps)

    def start(self, noise: Tensor, level: float) -> Tensor:
        return noise * level

    def noised(self, schedule: DiffusionSchedule, x0: Tensor, noise: Tensor, level: float) -> Tensor:
        return x0 + level * noise


class SigmaGridWithoutPenultimate(SigmaGrid):
    """A schedule's noise levels for one step more, the next-to-last dropped (the webui's DPM2 grid)."""

    name = "sigmas without the next-to-last"

    def levels(self, schedule: DiffusionSchedule, steps: int, schedule_type: str = "uniform") -> list[float]:
        sigmas = schedule_levels(schedule_type, schedule, steps + 1)
        return sigmas[:-2] + sigmas[-1:]


TIMESTEPS = TimestepGrid()
TIME_UNIFORM = TimeUniformGrid()
LCM_TIMESTEPS = LcmTimestepGrid()
SIGMAS = SigmaGrid()
SIGMAS_WITHOUT_PENULTIMATE = SigmaGridWithoutPenultimate()
