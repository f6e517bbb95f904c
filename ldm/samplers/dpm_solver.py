"""DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li & Zhu (2022), "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2 (multistep, second order, data prediction).

Written over the k-diffusion denoiser (:class:`ldm.samplers.common.ScheduledEps`) and sigma grid, as k-diffusion's
``sample_dpmpp_2m``: with ``lambda = -log(sigma)`` and ``h = lambda_next - lambda``, one step is

    x_next = (sigma_next / sigma) * x - expm1(-h) * D,    D = (1 + 1/(2r)) D_now - 1/(2r) D_prev,  r = h_prev / h

(the paper's eq. in the "x = alpha * x0 + sigma * eps" form divided by alpha). The first step has no
history and is first order (DPM-Solver++(1) = DDIM); the last step goes to sigma 0, where lambda is infinite,
and is first order too (lower-order final step): it returns the denoiser's output.

DPM-Solver++(2S) ancestral (``dpmpp_2s_a``): the same data-prediction update, single-step with a midpoint
model call at ``lambda + h / 2``, each step ending at the ancestral ``sigma_down`` before fresh noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ldm.samplers.common import Callback, NoiseSampler, ScheduledEps, as_floats, report
from ldm.samplers.k_diffusion import ancestral_step


@torch.no_grad()
def sample_dpmpp_2m(
    model: ScheduledEps, x: Tensor, sigmas: Sequence[float] | Tensor, *, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M) from ``x`` at ``sigmas[0]`` down to ``sigmas[-1]`` (0 ends with a first-order step)."""
    sigmas = as_floats(sigmas)
    total = len(sigmas) - 1
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = report(callback, i, total, x)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    eta: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2S) (the paper's Algorithm 1, single-step, second order, r = 1/2) down to each step's
    ``sigma_down``, then fresh noise of std ``sigma_up`` (:func:`ldm.samplers.k_diffusion.ancestral_step`), as
    k-diffusion's ``sample_dpmpp_2s_ancestral``; a step down to 0 is Euler."""
    sigmas = as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = math.sqrt(sigma * sigma_down)  # lambda + h / 2
            x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * model(x_2, sigma_mid)
        if sigma_up > 0:
            x = x + (noise_sampler or torch.randn_like)(x) * sigma_up
        x = report(callback, i, total, x)
    return x
