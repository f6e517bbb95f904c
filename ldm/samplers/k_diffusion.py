"""The k-diffusion samplers (Crowson, ``k_diffusion/sampling.py``) over an SD eps model.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models": the latent is
``x = x0 + sigma * eps`` and a sampler integrates the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) /
sigma`` from ``sigmas[0]`` down to ``sigmas[-1] = 0`` with a denoiser ``D`` (:class:`ldm.samplers.common.ScheduledEps`, k-diffusion's
``CompVisDenoiser``). The grid is :meth:`ldm.samplers.schedule.DiffusionSchedule.get_sigmas`.

Ancestral variants (``euler_a``, ``dpm2_a``) are the same functions with ``eta = 1``: each step goes down to
``sigma_down`` deterministically, then adds fresh noise of std ``sigma_up`` (:func:`ancestral_step`); with
``eta = 0`` that split is ``(sigma_next, 0)`` and the sampler is the deterministic one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from ldm.samplers.common import Callback, NoiseSampler, ScheduledEps, as_floats, report


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The ODE derivative ``dx/dsigma = (x - D) / sigma`` (Karras et al., eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """``(sigma_down, sigma_up)``: go down to sigma_down, add noise of std sigma_up; their squares add to
    ``sigma_next**2``. eta=1 gives DDPM's ancestral noise amount, eta=0 the deterministic step."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _add_noise(x: Tensor, sigma_up: float, noise_sampler: NoiseSampler | None) -> Tensor:
    if sigma_up == 0:
        return x
    return x + (noise_sampler or torch.randn_like)(x) * sigma_up



@torch.no_grad()
def sample_euler(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps (Karras et al., Algorithm 2 without churn); ``eta=1`` is ``euler_a`` (ancestral)."""
    sigmas = as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma = sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        x = x + to_d(x, sigma, model(x, sigma)) * (sigma_down - sigma)
        x = _add_noise(x, sigma_up, noise_sampler)
        x = report(callback, i, total, x)
    return x


@torch.no_grad()
def sample_heun(
    model: ScheduledEps, x: Tensor, sigmas: Sequence[float] | Tensor, *, callback: Callback | None = None
) -> Tensor:
    """Heun's second-order steps (Karras et al., Algorithm 2 without churn); the step to sigma 0 is Euler."""
    sigmas = as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, sigma, model(x, sigma))
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        x = report(callback, i, total, x)
    return x


@torch.no_grad()
def sample_dpm2(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver-2-style midpoint steps (Lu et al. 2022, Algorithm 1 with r=1/2, in k-diffusion's form): the
    derivative at the log-sigma midpoint drives the whole step; the step to sigma 0 is Euler. ``eta=1`` is
    ``dpm2_a``."""
    sigmas = as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma = sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        d = to_d(x, sigma, model(x, sigma))
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)  # exp of the mean of the log-sigmas
            x_2 = x + d * (sigma_mid - sigma)
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_down - sigma)
        x = _add_noise(x, sigma_up, noise_sampler)
        x = report(callback, i, total, x)
    return x


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Linear multistep weights for step ``i``: the integrals over ``[sigmas[i], sigmas[i+1]]`` of the Lagrange
    basis polynomials on the nodes ``sigmas[i], sigmas[i-1], ..., sigmas[i-order+1]``.

    k-diffusion integrates them numerically (``scipy.integrate.quad``); they are polynomials, so here the
    integral is exact.
    """
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))
    return weights


@torch.no_grad()
def sample_lms(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    order: int = 4,
    callback: Callback | None = None,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) of up to ``order`` past derivatives, k-diffusion's ``lms``."""
    sigmas = as_floats(sigmas)
    total = len(sigmas) - 1
    ds: list[Tensor] = []  # newest last
    for i in range(total):
        ds = [*ds, to_d(x, sigmas[i], model(x, sigmas[i]))][-order:]
        weights = lms_coefficients(sigmas, i, len(ds))
        x = x + sum(w * d for w, d in zip(weights, reversed(ds)))
        x = report(callback, i, total, x)
    return x
