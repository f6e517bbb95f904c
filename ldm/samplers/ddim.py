"""DDIM: Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12, as CompVis ``ddim.py``.

The walk is over integer DDPM timesteps (:meth:`ldm.samplers.schedule.DiffusionSchedule.ddim_levels`): step ``i``
goes from ``levels[i]`` to ``levels[i + 1]``, the last level being 0 (CompVis' ``alphas_prev[0] =
alphas_cumprod[0]``). The latent is in the DDPM ("variance preserving") form ``x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps``; the result is ``x`` at ``alphas_cumprod[0]``, as CompVis returns it.

:func:`ddim_update` is also PLMS' update (``plms.py``): PLMS only changes which eps goes into it.
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
