"""The DPM-Solver++ SDE samplers (Lu et al. 2022, "DPM-Solver++"; k-diffusion's ``sample_dpmpp_sde``,
``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``) and the Brownian noise they draw, as the webui draws it.

The latent is ``x = x0 + sigma * eps`` (see :mod:`ldm.samplers.k_diffusion`); in ``t = -log(sigma)`` each step
is an exponential-integrator step of the denoiser ``D`` plus, with ``eta > 0``, fresh noise. That noise is
not drawn step by step but read off one Brownian path per image (:class:`BrownianNoise`, k-diffusion's
``BrownianTreeNoiseSampler``): torchsde's ``BrownianTree`` over ``[min(sigmas > 0), max(sigmas)]``, seeded with
the image's seed, so an image does not depend on its batch or on how finely the path is sampled. The webui
replaces torchsde's normal draws by a fresh generator of its RNG mode seeded with torchsde's seed; here the
same (``rng`` of :class:`ldm.samplers.noise.SeededNoise`), in float32 on the CPU, the result then moved to the
latent's device and dtype.

- ``dpmpp_sde``: DPM-Solver++ (stochastic), second order with a midpoint at ``r = 1/2``; 2 calls a step, 1 in
  the last (Euler down to 0).
- ``dpmpp_2m_sde``: DPM-Solver++(2M) SDE, the second-order correction from the previous denoised; ``heun`` or
  ``midpoint`` (the webui's "DPM++ 2M SDE") solver; 1 call a step, the last step returns the denoised.
- ``dpmpp_3m_sde``: DPM-Solver++(3M) SDE, up to two previous denoised; 1 call a step.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Sequence

import torch
import torchsde
import torchsde._brownian.brownian_interval as brownian_interval
from torch import Tensor

from ldm.samplers.common import Callback, NoiseSampler, ScheduledEps, as_floats, report
from ldm.samplers.k_diffusion import ancestral_step, to_d
from ldm.samplers.noise import make_generator


def _philox_randn(size, dtype, device, seed):
    return make_generator("gpu", seed).randn(size).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _normal_draws(rng: str) -> Iterator[None]:
    """torchsde's normal draws from a fresh generator of ``rng`` seeded with torchsde's seed (its own
    ``_randn`` is already the ``cpu`` one for float32 CPU trees; ``gpu`` swaps in Philox while the block runs).
    torchsde's warnings that a float32 time lies a rounding error outside the tree are silenced (k-diffusion's
    float32 round trips give them in the webui too)."""
    saved = brownian_interval._randn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
        if rng == "gpu":
            brownian_interval._randn = _philox_randn
        try:
            yield
        finally:
            brownian_interval._randn = saved


class BrownianNoise:
    """``noise(sigma, sigma_next)``: one torchsde Brownian tree per image over ``[sigma_min, sigma_max]``, its
    increment between the two levels scaled to unit variance (k-diffusion's ``BrownianTreeNoiseSampler``)."""

    def __init__(self, like: Tensor, sigma_min: float, sigma_max: float, seeds: Sequence[int], rng: str = "cpu"):
        self.like, self.rng = like, rng
        w0 = torch.zeros(like.shape[1:], dtype=torch.float32)
        t0, t1 = torch.as_tensor(float(sigma_min)), torch.as_tensor(float(sigma_max))
        with _normal_draws(rng):
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(seed)) for seed in seeds]

    @classmethod
    def for_batch(cls, like: Tensor, sigmas: Sequence[float], noise_sampler: NoiseSampler | None,
                  span: tuple[float, float] | None = None) -> "BrownianNoise":
        """The trees for a walk over ``sigmas``: the noise sampler's ``seeds`` and ``rng``
        (:class:`ldm.samplers.noise.SeededNoise`), or random seeds without them. ``span`` (lowest positive,
        highest level) is the trees' interval when it is not the walk's own: img2img walks the tail of the
        schedule, and the webui spans the trees over the whole schedule, so the noise depends on it."""
        seeds = getattr(noise_sampler, "seeds", None)
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, (like.shape[0],)).tolist()
        low, high = span if span is not None else (min(s for s in sigmas if s > 0), max(sigmas))
        return cls(like, low, high, seeds, getattr(noise_sampler, "rng", "cpu"))

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        # In float32, as the webui's sigmas: a path read at other times is another path (tol 1e-6 away).
        t0, t1 = torch.tensor(float(sigma), dtype=torch.float32), torch.tensor(float(sigma_next), dtype=torch.float32)
        lo, hi = (t1, t0) if t0 > t1 else (t0, t1)
        sign = -1.0 if t0 > t1 else 1.0
        with _normal_draws(self.rng):
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w / (t1 - t0).abs().sqrt()).to(device=self.like.device, dtype=self.like.dtype)


def _float32_round_trip(sigma: float, sigma_next: float, r: float) -> tuple[float, float, float]:
    """k-diffusion's ``sigma_fn(t_fn(.))`` in float32 for ``dpmpp_sde``'s noise queries: ``sigma``, the
    midpoint ``exp(-(t + r h))`` and ``sigma_next`` as its float32 arithmetic gives them."""
    t = -torch.tensor(sigma, dtype=torch.float32).log()
    t_next = -torch.tensor(sigma_next, dtype=torch.float32).log()
    s = t + (t_next - t) * r
    return float((-t).exp()), float((-s).exp()), float((-t_next).exp())



@torch.no_grad()
def sample_dpmpp_sde(model: ScheduledEps, x: Tensor, sigmas: Sequence[float] | Tensor, *, eta: float = 1.0,
                     noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                     r: float = 0.5, span: tuple[float, float] | None = None) -> Tensor:
    """DPM-Solver++ (stochastic): a first-order step to ``t + r h`` with its share of noise, the denoiser
    there, then the whole step with the blended denoised; the step to sigma 0 is Euler."""
    sigmas = as_floats(sigmas)
    noise = BrownianNoise.for_batch(x, sigmas, noise_sampler, span) if eta > 0 else None
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            t = -math.log(sigma)
            sigma_s = math.exp(-(t + (-math.log(sigma_next) - t) * r))
            times = _float32_round_trip(sigma, sigma_next, r)
            x_2 = _exponential_step(x, sigma, sigma_s, denoised, eta, noise, times[:2])
            denoised_2 = model(x_2, sigma_s)
            fac = 1 / (2 * r)
            x = _exponential_step(x, sigma, sigma_next, (1 - fac) * denoised + fac * denoised_2, eta, noise,
                                  times[::2])
        x = report(callback, i, total, x)
    return x


def _exponential_step(x: Tensor, sigma: float, sigma_to: float, denoised: Tensor, eta: float,
                      noise: BrownianNoise | None, times: tuple[float, float]) -> Tensor:
    """DPM-Solver++'s first-order step from ``sigma`` down to the ancestral ``sigma_down`` of ``sigma_to``, then
    the Brownian increment between ``times`` (``sigma`` and ``sigma_to`` as k-diffusion computes them) times
    ``sigma_up``."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta)
    x = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down) - math.log(sigma)) * denoised
    if noise is not None and sigma_up > 0:
        x = x + noise(*times) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: ScheduledEps, x: Tensor, sigmas: Sequence[float] | Tensor, *, eta: float = 1.0,
                        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                        solver_type: str = "midpoint", span: tuple[float, float] | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE: each step corrected with the previous step's denoised (``midpoint`` or ``heun``
    weights); the last step returns the denoised."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    sigmas = as_floats(sigmas)
    noise = BrownianNoise.for_batch(x, sigmas, noise_sampler, span) if eta > 0 else None
    total = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = sigma_next / sigma * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                weight = (phi / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * phi
                x = x + weight * (h / h_last) * (denoised - old_denoised)
            if noise is not None:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
        x = report(callback, i, total, x)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: ScheduledEps, x: Tensor, sigmas: Sequence[float] | Tensor, *, eta: float = 1.0,
                        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None, span: tuple[float, float] | None = None) -> Tensor:
    """DPM-Solver++(3M) SDE: third order from the two previous denoised (second order in the second step);
    the last step returns the denoised."""
    sigmas = as_floats(sigmas)
    noise = BrownianNoise.for_batch(x, sigmas, noise_sampler, span) if eta > 0 else None
    total = len(sigmas) - 1
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if noise is not None:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        x = report(callback, i, total, x)
    return x
