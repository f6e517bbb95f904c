"""Restart sampling (``restart``): Xu, Deng, Jaakkola, Tong & Li (2023), "Restart Sampling for Improving
Generative Processes", as AUTOMATIC1111's webui runs it (``modules/sd_samplers_extra.py::restart_sampler``
with its automatic restart list).

The walk is Heun steps (:func:`ldm.samplers.k_diffusion.sample_heun`'s, Euler into sigma 0). With 20 steps or
more the walk is planned again: ``restart_steps = 9`` and ``restart_times = 1`` (36 steps or more:
``steps // 4`` and 2); the main walk becomes Karras levels (rho 7) for ``steps - restart_steps * restart_times``
steps between the walk's next-to-last level and its first; the restart interval runs from the main level
nearest 0.1 (``t_min``) up to the main level nearest 2 (``t_max``). Right after the step that reaches
``t_min``, the sampler restarts ``restart_times`` times: noise brings the latent from ``t_min`` back up to
``t_max`` (std ``sqrt(t_max**2 - t_min**2)``, the paper's forward process), then ``restart_steps`` Heun steps
walk the Karras levels (``restart_steps + 1`` of them, 0 left out) from ``t_max`` back down to ``t_min``; then
the main walk goes on. Under 20 steps the walk is plain Heun over the levels given.

Every step is one report to the callback; a step whose start is above where the last one ended first adds
the noise that closes the gap (which only a restart does). The noise comes from the noise sampler, like the
ancestral samplers' (the webui draws it from its seeded ``randn_like``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ldm.samplers.common import Callback, NoiseSampler, ScheduledEps, report
from ldm.samplers.k_diffusion import to_d
from ldm.samplers.schedules import karras

RESTART_MIN, RESTART_MAX = 0.1, 2.0  # the webui's interval: from the level nearest 0.1 up to the one nearest 2


def _nearest(levels: Sequence[float], value: float) -> int:
    """The index of the level nearest ``value`` (the first on a tie, as ``torch.argmin``)."""
    return min(range(len(levels)), key=lambda i: abs(levels[i] - value))


def restart_plan(levels: Sequence[float]) -> list[tuple[float, float]]:
    """The steps ``(from, to)`` restart sampling takes over the walk ``levels`` (see the module docstring)."""
    levels = [float(s) for s in levels]
    steps = len(levels) - 1
    if steps < 20:
        return list(zip(levels[:-1], levels[1:]))
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = karras(steps - restart_steps * restart_times, levels[-2], levels[0])
    low, high = _nearest(main, RESTART_MIN), _nearest(main, RESTART_MAX)
    plan = []
    for i in range(len(main) - 1):
        plan.append((main[i], main[i + 1]))
        if i + 1 == low and high < low:
            segment = karras(restart_steps + 1, main[low], main[high])[:-1]
            plan.extend(list(zip(segment[:-1], segment[1:])) * restart_times)
    return plan


def restart_step_levels(levels: Sequence[float]) -> list[float]:
    """The levels ``restart`` stands at after each of its steps (first: where it starts); they go back up at
    each restart."""
    plan = restart_plan(levels)
    return [plan[0][0], *(end for _, end in plan)]


@torch.no_grad()
def sample_restart(
    model: ScheduledEps,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Restart sampling over ``sigmas`` (see the module docstring); ``s_noise`` scales the restart noise."""
    plan = restart_plan(sigmas)
    last = plan[0][0]
    for i, (sigma, sigma_next) in enumerate(plan):
        if sigma > last:  # a restart: back up to sigma with fresh noise
            x = x + (noise_sampler or torch.randn_like)(x) * s_noise * math.sqrt(sigma**2 - last**2)
        d = to_d(x, sigma, model(x, sigma))
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + to_d(x_2, sigma_next, model(x_2, sigma_next))) / 2 * dt
        last = sigma_next
        x = report(callback, i, len(plan), x)
    return x
