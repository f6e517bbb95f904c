"""UniPC: Zhao, Bai, Rao, Zhou & Lu (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", as AUTOMATIC1111's webui runs it (``modules/models/diffusion/uni_pc``, through
``sd_samplers_timesteps``) with its defaults: the multistep data-prediction solver (``predict_x0``), variant
``bh1`` (``B(h) = h``), order 3, lower orders at the first steps (no history yet) and the final ones
(``lower_order_final``), the corrector UniC after every step but the last; diffusers'
``UniPCMultistepScheduler(solver_type="bh1", solver_order=3, predict_x0=True)`` is the same method.

The walk is over (fractional) DDPM timesteps, descending to the final level 0 (``alphas_cumprod[0]``, as the
webui's ``t_0 = 1 / N``); ``alpha_t = sqrt(alphas_cumprod)`` interpolates linearly in log between integer
timesteps (:meth:`ldm.samplers.schedule.DiffusionSchedule.alpha_bar`, the webui's ``NoiseScheduleVP("discrete")``),
``sigma_t = sqrt(1 - alpha_t^2)``, ``lambda_t = log(alpha_t / sigma_t)``. Each step predicts with the
last ``order`` x0 predictions (UniP), calls the model once at the prediction, and corrects the step with that
call (UniC); the call is the next step's history, so a step costs one model call (the first one two, the
initial one too; the last none: it is not corrected). A walk shorter than 3 steps uses order ``len(levels) - 1`` (the webui refuses it).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ldm.samplers.common import Callback, ScheduledEps, report


def _coefficients(hh: float, rks: list[float], order: int) -> tuple[Tensor, Tensor]:
    """UniPC-bh1's system ``R rho = b``: ``R[i, k] = r_k^i``, ``b_i = (i + 1)! phi_{i+2}(hh) hh / B(h)``."""
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / hh)  # B(h) = hh (bh1)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def _weighted(weights: Tensor, diffs: list[Tensor]) -> Tensor | float:
    return sum(float(w) * d for w, d in zip(weights, diffs)) if diffs else 0.0


@torch.no_grad()
def sample_unipc(
    model: ScheduledEps,
    x: Tensor,
    levels: Sequence[float],
    *,
    order: int = 3,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC (bh1, data prediction) from ``x`` at timestep ``levels[0]`` down the descending ``levels``."""
    total = len(levels) - 1
    order = min(order, total)

    def coefficients(t: float) -> tuple[float, float, float]:  # alpha_t, sigma_t, lambda_t
        a = model.alpha_bar(t)
        return math.sqrt(a), math.sqrt(1 - a), 0.5 * math.log(a / (1 - a))

    def data(x: Tensor, t: float) -> Tensor:  # the x0 prediction
        alpha, sigma, _ = coefficients(t)
        return (x - sigma * model.eps(x, t)) / alpha

    x0s, lambdas = [data(x, levels[0])], [coefficients(levels[0])[2]]  # the history, newest last
    for i in range(total):
        t, t_prev = levels[i + 1], levels[i]
        step_order = min(order, i + 1, total - i)
        alpha_t, sigma_t, lambda_t = coefficients(t)
        sigma_prev = coefficients(t_prev)[1]
        h = lambda_t - lambdas[-1]
        hh = -h  # data prediction
        rks = [(lambdas[-(k + 1)] - lambdas[-1]) / h for k in range(1, step_order)]
        diffs = [(x0s[-(k + 1)] - x0s[-1]) / r for k, r in zip(range(1, step_order), rks)]
        R, b = _coefficients(hh, [*rks, 1.0], step_order)
        x_t_ = (sigma_t / sigma_prev) * x - (alpha_t * math.expm1(hh)) * x0s[-1]
        if step_order == 1:
            rhos_p = torch.zeros(0, dtype=torch.float64)
        elif step_order == 2:
            rhos_p = torch.tensor([0.5], dtype=torch.float64)
        else:
            rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
        x = x_t_ - (alpha_t * hh) * _weighted(rhos_p, diffs)  # UniP
        if i < total - 1:  # UniC with the model at the prediction; not after the last step
            x0_t = data(x, t)
            rhos_c = torch.tensor([0.5], dtype=torch.float64) if step_order == 1 else torch.linalg.solve(R, b)
            x = x_t_ - (alpha_t * hh) * (_weighted(rhos_c[:-1], diffs) + float(rhos_c[-1]) * (x0_t - x0s[-1]))
            x0s, lambdas = [*x0s, x0_t][-order:], [*lambdas, lambda_t][-order:]
        x = report(callback, i, total, x)
    return x
