"""What every sampler shares: the model it calls, the callback and noise types, the progress report.

Every sampler is one function with one calling convention (k-diffusion's, ``k_diffusion/sampling.py``)::

    sample_x(model: ScheduledEps, x, levels, *, callback=None, **options) -> x

``levels`` is the walk the sampler's grid gives (DDIM timesteps for ``ddim``/``plms``, k-diffusion sigmas for
the rest, see :mod:`ldm.samplers.grids`); ``model`` is :class:`ScheduledEps`, an eps model bound to its
schedule, which the timestep samplers call as ``model.eps(x, t)`` and the sigma samplers as the denoiser
``model(x, sigma)``. Options are keyword-only: ``eta`` and ``noise_sampler`` for the samplers with an
ancestral (stochastic) variant, ``order`` for ``lms``.

An eps model is ``eps_model(x, t) -> eps`` with ``t`` a float32 tensor ``[B]`` (fractional timesteps allowed);
:class:`ldm.samplers.guidance.GuidedDenoiser` is the usual one. A noise sampler is ``noise_sampler(like) -> Tensor``,
fresh standard-normal noise shaped like ``like`` (``torch.randn_like`` or :class:`ldm.samplers.noise.SeededNoise`).

Progress: after each step a sampler calls ``callback(step, total, x)`` with the 0-based index of the step
just finished, the number of steps in this run (0 where it is not known in advance: ``dpm_adaptive``) and the
current latent. To stop a run early, raise from the
callback (any exception, e.g. ``KeyboardInterrupt`` or the script's own): it propagates out of
:func:`ldm.samplers.sample` unchanged, and since samplers keep no state outside the call, nothing needs
cleaning up.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ldm.samplers.schedule import DiffusionSchedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[Tensor], Tensor]
Callback = Callable[[int, int, Tensor], "Tensor | None"]


def as_floats(sigmas: Sequence[float] | Tensor) -> list[float]:
    """The levels as Python floats, for the samplers' step arithmetic (a tensor or a list alike)."""
    return [float(s) for s in sigmas]


def timestep_tensor(x: Tensor, t: float) -> Tensor:
    """The model's timestep argument: ``t`` for each image of ``x``, float32, on ``x``'s device."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def report(callback: Callback | None, step: int, total: int, x: Tensor) -> Tensor:
    """Step ``step`` of ``total`` is done: the latent the walk continues from, which a callback may replace
    by returning a tensor (inpainting's blend of the known region); a callback returning None keeps ``x``."""
    if callback is None:
        return x
    replaced = callback(step, total, x)
    return x if replaced is None else replaced


class ScheduledEps:
    """An eps model and its schedule: what every sampler function takes as ``model``.

    - ``eps(x, t)``: the eps model at (integer or fractional) timestep ``t``; ``alpha_bar(t)`` the schedule's
      ``alphas_cumprod[t]`` (the timestep samplers, ``ddim`` and ``plms``).
    - ``model(x, sigma)``: the denoiser ``D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma))``,
      k-diffusion's ``CompVisDenoiser`` (the sigma samplers): ``c_in = 1 / sqrt(sigma^2 + 1)`` turns
      ``x0 + sigma * eps`` back into the DDPM form the UNet was trained on; ``t(sigma)`` is the schedule's
      log-sigma interpolation (fractional between integer timesteps).
    """

    def __init__(self, eps_model: EpsModel, schedule: DiffusionSchedule) -> None:
        self.eps_model = eps_model
        self.schedule = schedule

    def eps(self, x: Tensor, t: float) -> Tensor:
        return self.eps_model(x, timestep_tensor(x, t))

    def alpha_bar(self, t: int) -> float:
        return self.schedule.alpha_bar(t)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        t = float(self.schedule.sigma_to_t(sigma))
        eps = self.eps_model(x * (1 / math.sqrt(sigma**2 + 1)), timestep_tensor(x, t))
        return x - sigma * eps
