"""DPM-Solver with fixed steps of order 3 (``dpm_fast``): Lu, Zhou, Bao, Chen, Li & Zhu (2022), "DPM-Solver: A
Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps", Algorithms 1 and 2 (DPM-Solver-2
and -3, eps prediction) and section 3.4's "DPM-Solver-fast" step plan, as k-diffusion's ``sample_dpm_fast``.

Time is ``t = -log sigma`` (the paper's lambda); the eps model is ``(x - D(x, sigma)) / sigma``. With ``h = t_next
- t`` the first-order step is ``x - sigma_next * expm1(h) * eps`` (DDIM); the second- and third-order steps add
the paper's corrections from one and two extra model calls at ``t + h / 3`` and ``t + 2 h / 3`` (order 2 here
uses ``r1 = 1/2``).

The step plan spends exactly ``n`` model calls: ``m = n // 3 + 1`` steps evenly spaced in ``t`` between
``sigma_max`` and ``sigma_min``, of order 3 but the last ones (``n % 3`` for the last, or 2 then 1 when 3 divides
``n``). It uses only the ends of the walk it is given and its number of steps: like k-diffusion's (and the
webui's), it ignores the schedule type and stops at ``sigma_min``, not 0. With ``eta > 0`` each step ends at
the ancestral level and fresh noise brings it back up to the step's level (the webui runs it with eta 1).

DPM-Solver with adaptive steps (``dpm_adaptive``), the same paper's section 4 and Algorithm 5 (DPM-Solver-23: a
second- and a third-order step from the same model calls, their difference the local error), as k-diffusion's ``sample_dpm_adaptive`` with its defaults (order 3, rtol 0.05, atol 0.0078,
h_init 0.05, an integral-only step controller with accept safety 0.81), called as the webui calls it: from
the walk's highest level to its lowest one above 0, eta 1 (``--eta`` replaces it).

A step of size ``h`` from ``t`` spends 3 model calls (at ``t``, ``t + h / 3``,
``t + 2 h / 3``); the error is the root mean square, over the whole batch, of ``(x_low - x_high) / delta`` with
``delta = max(atol, rtol * max(|x_low|, |x_low of the last accepted step|))``. The controller scales ``h`` by
``1 + atan(f - 1)`` with ``f = (1 / error) ** (1 / order)`` (order 1.5 when eta > 0) and accepts the step when
that factor is at least 0.81; a rejected step is tried again, shorter. So the number of steps is not known in
advance (the step count is ignored): the callback gets ``total = 0`` after each accepted step, and
inpainting with a 4-channel checkpoint, whose blend needs the levels beforehand, refuses this sampler.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ldm.samplers.common import Callback, NoiseSampler, ScheduledEps, as_floats, report
from ldm.samplers.k_diffusion import ancestral_step


def _t(sigma: float) -> float:
    return math.inf if sigma == 0 else -math.log(sigma)


def _sigma(t: float) -> float:
    return math.exp(-t)


def _eps(model: ScheduledEps, x: Tensor, t: float) -> Tensor:
    sigma = _sigma(t)
    return (x - model(x, sigma)) / sigma


def dpm_solver_step(model: ScheduledEps, x: Tensor, eps: Tensor, t: float, t_next: float, order: int) -> Tensor:
    """One DPM-Solver-``order`` step from ``t`` to ``t_next`` given ``eps`` at ``(x, t)``: ``order - 1`` more calls."""
    h = t_next - t
    sigma_next = _sigma(t_next)
    x_1 = x - sigma_next * math.expm1(h) * eps
    if order == 1:
        return x_1
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    eps_r1 = _eps(model, x - _sigma(s1) * math.expm1(r1 * h) * eps, s1)
    if order == 2:
        return x_1 - sigma_next / (2 * r1) * math.expm1(h) * (eps_r1 - eps)
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - _sigma(s2) * math.expm1(r2 * h) * eps
          - _sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = _eps(model, u2, s2)
    return x_1 - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def fast_plan(levels: Sequence[float]) -> tuple[list[float], list[int]]:
    """The steps' ends in ``t`` (``m + 1`` of them) and their orders, for ``len(levels) - 1`` model calls between
    the walk's highest level and its lowest one above 0."""
    calls = len(levels) - 1
    if calls < 1:
        raise ValueError("dpm_fast needs at least one step")
    sigma_max, sigma_min = max(levels), min(s for s in levels if s > 0)
    steps = calls // 3 + 1
    t_start, t_end = _t(sigma_max), _t(sigma_min)
    ts = [t_start + (t_end - t_start) * k / steps for k in range(steps)] + [t_end]
    orders = [3] * (steps - 2) + [2, 1] if calls % 3 == 0 else [3] * (steps - 1) + [calls % 3]
    return ts, orders


def fast_step_levels(levels: Sequence[float]) -> list[float]:
    """The levels ``dpm_fast`` stands at after each of its steps (first: where it starts)."""
    return [_sigma(t) for t in fast_plan(levels)[0]]


@torch.no_grad()
def sample_dpm_fast(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver-fast over the ends of ``sigmas`` with ``len(sigmas) - 1`` model calls (see the module docstring)."""
    ts, orders = fast_plan(as_floats(sigmas))
    total = len(orders)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = t_next, 0.0
        if eta > 0:
            sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_down = min(ts[-1], _t(sigma_down))
            sigma_up = math.sqrt(max(_sigma(t_next) ** 2 - _sigma(t_down) ** 2, 0.0))
        x = dpm_solver_step(model, x, _eps(model, x, t), t, t_down, order)
        if eta > 0:  # k-diffusion draws on every step when eta > 0, sigma_up 0 or not
            x = x + sigma_up * (noise_sampler or torch.randn_like)(x)
        x = report(callback, i, total, x)
    return x


def _low_high(model: ScheduledEps, x: Tensor, t: float, t_next: float, order: int) -> tuple[Tensor, Tensor]:
    """DPM-Solver of order ``order - 1`` and ``order`` from ``t`` to ``t_next``, sharing their model calls."""
    h = t_next - t
    sigma_next = _sigma(t_next)
    eps = _eps(model, x, t)
    x_1 = x - sigma_next * math.expm1(h) * eps
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    eps_r1 = _eps(model, x - _sigma(s1) * math.expm1(r1 * h) * eps, s1)
    x_2 = x_1 - sigma_next / (2 * r1) * math.expm1(h) * (eps_r1 - eps)
    if order == 2:
        return x_1, x_2
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - _sigma(s2) * math.expm1(r2 * h) * eps
          - _sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = _eps(model, u2, s2)
    return x_2, x_1 - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


class StepController:
    """k-diffusion's PID step-size controller (Söderlind's digital filters) on the inverse error."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        """Scale ``h`` for the next try; whether the step just tried is accepted."""
        inverse = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inverse] * 3
        self.errs[0] = inverse
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[1:] = self.errs[:2]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Adaptive DPM-Solver-``order - 1``/``order`` between the ends of ``sigmas`` (see the module docstring)."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    levels = as_floats(sigmas)
    t, t_end = _t(max(levels)), _t(min(s for s in levels if s > 0))
    controller = StepController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta > 0 else order, accept_safety)
    x_prev, accepted = x, 0
    while t < t_end - 1e-5:
        t_next = min(t_end, t + controller.h)
        t_down, sigma_up = t_next, 0.0
        if eta > 0:
            sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_down = min(t_end, _t(sigma_down))
            sigma_up = math.sqrt(max(_sigma(t_next) ** 2 - _sigma(t_down) ** 2, 0.0))
        x_low, x_high = _low_high(model, x, t, t_down, order)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = torch.linalg.norm(((x_low - x_high) / delta).double()) / math.sqrt(x.numel())
        if controller.propose(float(error)):
            x_prev, x, t = x_low, x_high, t_next
            if eta > 0:  # k-diffusion draws on every accepted step when eta > 0
                x = x + sigma_up * (noise_sampler or torch.randn_like)(x)
            x = report(callback, accepted, 0, x)
            accepted += 1
    return x
