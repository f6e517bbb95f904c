"""Schedule types: the noise levels a sigma sampler walks, as AUTOMATIC1111's webui v1.10 computes them
(``modules/sd_schedulers.py``; the first four are k-diffusion's ``get_sigmas_*``).

Each function returns ``n + 1`` levels, descending, as floats: ``n`` noise levels then a final 0 (``ddim``
may give more, as CompVis' DDIM spacing does; ``kl_optimal`` ends at ``sigma_min`` instead of 0, as the
webui's does). ``sigma_min`` and ``sigma_max`` are the model's own, the ends of its discrete sigmas in float32
as the webui's ``CompVisDenoiser`` computes them (about 0.0291675 and 14.6146 for SD v1: ``1 - alphas_cumprod[0]``
in float32 moves sigma_min by 1.3e-5 relative from its float64 value). The schedules that read the model's
sigmas at timesteps (``uniform``, ``sgm_uniform``, ``simple``, ``normal``, ``ddim``) read them in float64, as
the uniform grid always has here.

- ``uniform``: k-diffusion's ``get_sigmas(n)`` of ``CompVisDenoiser``, ``n`` timesteps evenly spaced from 999
  to 0 (:meth:`ldm.samplers.schedule.DiffusionSchedule.get_sigmas`).
- ``karras``: Karras et al. (2022), eq. 5, rho 7: evenly spaced in ``sigma ** (1 / rho)``.
- ``exponential``: evenly spaced in log sigma; ``polyexponential``: log sigma along ``ramp ** rho``, rho 1
  (which is ``exponential`` again).
- ``sgm_uniform``: ``n + 1`` timesteps evenly spaced from 999 to 0, the last one (t = 0) dropped.
- ``kl_optimal``: Sabour et al. (2024), "Align Your Steps", eq. 8: evenly spaced in ``arctan(sigma)``.
- ``align_your_steps``: SD 1.5's 11 levels from NVIDIA's "Align Your Steps" page, interpolated log-linearly
  to ``n`` levels.
- ``simple``: every ``1000 / n``-th of the model's sigmas from the top (ComfyUI's simple).
- ``normal``: ``n`` timesteps evenly spaced from 999 to 0 (``uniform`` again, through ``sigma_to_t``).
- ``ddim``: the model's sigmas at timesteps 1, 1 + 1000 // n, ... (the webui's ``ddim_scheduler``).
- ``beta``: Lee et al. (2024), "Beta Sampling is All You Need": timesteps at the quantiles of a
  Beta(0.6, 0.6) distribution, mapped linearly onto [sigma_min, sigma_max] (``scipy.stats.beta.ppf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ldm.samplers.schedule import DiffusionSchedule

__all__ = ["SCHEDULES", "SCHEDULE_NAMES", "Schedule", "schedule_levels"]

# SD 1.5's levels from https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html (the webui's list).
ALIGN_YOUR_STEPS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
BETA_ALPHA = BETA_BETA = 0.6  # the webui's defaults (beta_dist_alpha, beta_dist_beta)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """``(sigma_max ** (1/rho) + i / (n - 1) * (sigma_min ** (1/rho) - sigma_max ** (1/rho))) ** rho``, then 0."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [*((hi + ramp * (lo - hi)) ** rho).tolist(), 0.0]


def exponential(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """``exp(linspace(log sigma_max, log sigma_min, n))``, then 0."""
    return [*np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)).tolist(), 0.0]


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> list[float]:
    """``exp(linspace(1, 0, n) ** rho * (log sigma_max - log sigma_min) + log sigma_min)``, then 0."""
    ramp = np.linspace(1, 0, n) ** rho
    log_min = math.log(sigma_min)
    return [*np.exp(ramp * (math.log(sigma_max) - log_min) + log_min).tolist(), 0.0]


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """``tan(i / n * arctan(sigma_min) + (1 - i / n) * arctan(sigma_max))`` for i = 0..n: ends at sigma_min."""
    i = np.arange(n + 1) / n
    return np.tan(i * math.atan(sigma_min) + (1 - i) * math.atan(sigma_max)).tolist()


def align_your_steps(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """The 11 SD 1.5 levels (as they are for n = 11), else interpolated linearly in log sigma to ``n``."""
    levels = np.array(ALIGN_YOUR_STEPS_SD15)
    if n != len(levels):
        xs = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, n), xs, np.log(levels[::-1])))[::-1]
    return [*levels.tolist(), 0.0]


def beta(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """``sigma_min + ppf(1 - i / (n - 1)) * (sigma_max - sigma_min)`` with the Beta(0.6, 0.6) quantile, then 0."""
    from scipy import stats  # only this schedule needs scipy: imported when it is chosen

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
    return [*(sigma_min + quantiles * (sigma_max - sigma_min)).tolist(), 0.0]


def uniform(n: int, schedule: DiffusionSchedule) -> list[float]:
    """k-diffusion's ``get_sigmas(n)``: timesteps ``linspace(T - 1, 0, n)``, then 0."""
    return schedule.get_sigmas(n).tolist()


def sgm_uniform(n: int, schedule: DiffusionSchedule) -> list[float]:
    """Timesteps ``linspace(T - 1, 0, n + 1)`` without the last, then 0."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return [*schedule.t_to_sigma(t).tolist(), 0.0]


def simple(n: int, schedule: DiffusionSchedule) -> list[float]:
    """``sigmas[-(1 + int(i * T / n))]`` for i < n, then 0."""
    sigmas, stride = schedule.sigmas, schedule.num_timesteps / n
    return [*(float(sigmas[-(1 + int(i * stride))]) for i in range(n)), 0.0]


def normal(n: int, schedule: DiffusionSchedule) -> list[float]:
    """Timesteps ``linspace(t(sigma_max), t(sigma_min), n)`` (999 to 0), then 0."""
    start, end = (float(schedule.sigma_to_t(s)) for s in (schedule.sigmas[-1], schedule.sigmas[0]))
    return [*schedule.t_to_sigma(torch.linspace(start, end, n, dtype=torch.float64)).tolist(), 0.0]


def ddim(n: int, schedule: DiffusionSchedule) -> list[float]:
    """The sigmas at timesteps ``range(1, T, max(T // n, 1))``, descending, then 0."""
    timesteps = range(1, schedule.num_timesteps, max(schedule.num_timesteps // n, 1))
    return [*(float(schedule.sigmas[t]) for t in reversed(timesteps)), 0.0]


@dataclass(frozen=True)
class Schedule:
    """One schedule type: the name ``--schedule`` takes, the webui's label (written as ``Schedule type``),
    and its function: ``function(n, sigma_min, sigma_max)`` or, with ``needs_model``, ``function(n, schedule)``."""

    name: str
    label: str
    function: Callable[..., list[float]] | None
    needs_model: bool = False
    aliases: tuple[str, ...] = ()


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("automatic", "Automatic", None),  # each sampler's own (Sampler.automatic)
        Schedule("uniform", "Uniform", uniform, needs_model=True),
        Schedule("karras", "Karras", karras),
        Schedule("exponential", "Exponential", exponential),
        Schedule("polyexponential", "Polyexponential", polyexponential),
        Schedule("sgm_uniform", "SGM Uniform", sgm_uniform, needs_model=True, aliases=("SGMUniform",)),
        Schedule("kl_optimal", "KL Optimal", kl_optimal),
        Schedule("align_your_steps", "Align Your Steps", align_your_steps),
        Schedule("simple", "Simple", simple, needs_model=True),
        Schedule("normal", "Normal", normal, needs_model=True),
        Schedule("ddim", "DDIM", ddim, needs_model=True),
        Schedule("beta", "Beta", beta),
    )
}
SCHEDULE_NAMES = tuple(SCHEDULES)


def find_schedule(name: str) -> Schedule | None:
    """The schedule a name, a webui label or an alias means (``"karras"``, ``"Karras"``), or None."""
    for record in SCHEDULES.values():
        if name in (record.name, record.label, *record.aliases):
            return record
    return None


def schedule_levels(name: str, schedule: DiffusionSchedule, n: int) -> list[float]:
    """The levels of schedule type ``name`` (not ``automatic``: resolve it first) for ``n`` steps."""
    record = SCHEDULES[name]
    if record.function is None:
        raise ValueError(f"schedule {name!r} stands for a sampler's own; resolve it first")
    if n < 1:
        raise ValueError(f"steps must be at least 1, got {n}")
    if record.needs_model:
        return record.function(n, schedule)
    return record.function(n, *model_sigma_range(schedule))


def model_sigma_range(schedule: DiffusionSchedule) -> tuple[float, float]:
    """``(sigma_min, sigma_max)``: the ends of the model's sigmas computed in float32, as k-diffusion's
    ``CompVisDenoiser`` computes them from the float32 ``alphas_cumprod``."""
    ac = schedule.alphas_cumprod.float()
    sigmas = ((1 - ac) / ac) ** 0.5
    return float(sigmas[0]), float(sigmas[-1])
