"""DDIM: Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12, as CompVis ``ddim.py``.

The walk is over integer DDPM timesteps (:meth:`ldm.samplers.schedule.DiffusionSchedule.ddim_levels`): step ``i``
goes from ``levels[i]`` to ``levels[i + 1]``, the last level being 0 (CompVis' ``alphas_prev[0] =
alphas_cumprod[0]``). The latent is in the DDPM ("variance preserving") form ``x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps``; the result is ``x`` at ``alphas_cumprod[0]``, as CompVis returns it.

:func:`ddim_update` is also PLMS' update (``plms.py``): PLMS only changes which eps goes into it.

:func:`sample_lcm` is the multistep sampling of latent consistency models (Luo et al. 2023, "Latent Consistency
Models", Algorithm 3; diffusers' ``LCMScheduler.step``): the same x0 prediction, put through the consistency
boundary condition, then noised afresh to the next level instead of DDIM's deterministic direction.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ldm.samplers.common import Callback, NoiseSampler, ScheduledEps, report


def ddim_sigma(a_t: float, a_prev: float, eta: float) -> float:
    """Eq. 16: ``eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``; eta=1 is DDPM's posterior std."""
    return eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


def ddim_update(
    x: Tensor, eps: Tensor, a_t: float, a_prev: float, sigma: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """Eq. 12: from ``x`` at ``a_t`` to ``a_prev`` given the predicted noise ``eps``."""
    # 1. the predicted x0 ("predicted x_0" term)
    pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    # 2. the direction pointing to x_t, shortened by the noise that step 3 adds back
    x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    # 3. fresh noise (eta > 0 only)
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


LCM_SIGMA_DATA = 0.5  # diffusers' LCMScheduler: sigma_data, and timestep_scaling below
LCM_TIMESTEP_SCALING = 10.0


def lcm_boundary(t: float) -> tuple[float, float]:
    """``(c_skip, c_out)`` at timestep ``t``: the consistency function ``c_skip x + c_out x0`` is ``x`` at t = 0."""
    scaled = t * LCM_TIMESTEP_SCALING
    return LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + LCM_SIGMA_DATA**2)


@torch.no_grad()
def sample_lcm(
    model: ScheduledEps,
    x: Tensor,
    levels: Sequence[int],
    *,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """LCM from ``x`` at ``levels[0]`` down the descending ``levels`` (:data:`ldm.samplers.grids.LCM_TIMESTEPS`):
    each step predicts x0 (eq. 12's first term), applies the boundary condition, and, except after the last,
    noises it to the next level with ``s_noise`` times a draw from ``noise_sampler`` (the image's generator)."""
    noise_sampler = noise_sampler or torch.randn_like
    total = len(levels) - 1
    for i in range(total):
        a_t = model.alpha_bar(levels[i])
        eps = model.eps(x, levels[i])
        pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        c_skip, c_out = lcm_boundary(levels[i])
        x = c_out * pred_x0 + c_skip * x
        if i < total - 1:
            a_next = model.alpha_bar(levels[i + 1])
            x = math.sqrt(a_next) * x + math.sqrt(1 - a_next) * s_noise * noise_sampler(x)
        x = report(callback, i, total, x)
    return x


@torch.no_grad()
def sample_ddim(
    model: ScheduledEps,
    x: Tensor,
    levels: Sequence[int],
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM from ``x`` at timestep ``levels[0]`` down the descending ``levels``; eta > 0 draws ``noise_sampler``."""
    if not 0 <= eta <= 1:  # above 1 the step's noise exceeds what the schedule leaves room for
        raise ValueError(f"eta must be between 0 and 1, got {eta}")
    noise_sampler = noise_sampler or torch.randn_like
    total = len(levels) - 1
    for i in range(total):
        a_t, a_prev = model.alpha_bar(levels[i]), model.alpha_bar(levels[i + 1])
        eps = model.eps(x, levels[i])
        sigma = ddim_sigma(a_t, a_prev, eta)
        x = ddim_update(x, eps, a_t, a_prev, sigma, noise_sampler(x) if sigma > 0 else None)
        x = report(callback, i, total, x)
    return x
