"""The discrete DDPM noise schedule of SD v1 and the two time grids the samplers walk.

One object, :class:`DiffusionSchedule`, holds ``alphas_cumprod`` (float64) and derives everything else:

* **betas** as CompVis ``make_beta_schedule`` builds them (``"linear"`` is
  ``linspace(sqrt(start), sqrt(end), T) ** 2`` in float64, which diffusers calls ``scaled_linear``).
  The schedule is computed from the config in float64 (:meth:`DiffusionSchedule.from_config`), as diffusers
  and ComfyUI do; the ``alphas_cumprod`` buffer a checkpoint carries is only compared with it
  (:meth:`DiffusionSchedule.matches_buffer`): fp16 and bf16 files store it rounded (bf16 rounds
  ``alphas_cumprod[0] = 0.99915`` to 1.0), and sampling from the rounded copy changes the image.
* **DDIM timesteps** (the grid of the ``ddim`` and ``plms`` samplers), as CompVis
  ``make_ddim_timesteps(ddim_discr_method="uniform")``: ``range(0, T, T // K) + 1``. We follow CompVis and
  not diffusers because ``ddim``/``plms`` are CompVis' sampler names and their output is the reference.
  When ``K`` does not divide ``T`` this walks *more* than ``K`` timesteps (``K=6``: ``T // K = 166``,
  7 timesteps 1, 167, ..., 997); diffusers always walks exactly ``K``. Both agree when ``K`` divides ``T``.
  After the last timestep DDIM steps to ``alphas_cumprod[0]`` (CompVis ``alphas_prev[0] = alphas_cumprod[0]``,
  diffusers ``set_alpha_to_one=False``); :meth:`ddim_levels` writes that as a final level ``0``.
* **sigmas** of the k-diffusion formulation (Karras et al. 2022, "Elucidating the Design Space of
  Diffusion-Based Generative Models"): ``x_sigma = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``.
  ``sigma_to_t``/``t_to_sigma`` interpolate linearly in log-sigma between the integer timesteps, and
  :meth:`get_sigmas` is ``t_to_sigma(linspace(T - 1, 0, n))`` followed by a final 0, as k-diffusion's
  ``DiscreteSchedule`` (``k_diffusion/external.py``) does for ``CompVisDenoiser``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.config import ScheduleConfig


def make_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float, cosine_s: float = 8e-3) -> Tensor:
    """Betas as CompVis ``ldm/modules/diffusionmodules/util.py:make_beta_schedule``, in float64.

    ``linear`` (SD v1) is linear in sqrt(beta); ``sqrt_linear`` is linear in beta; ``sqrt`` is the square root
    of that; ``cosine`` is Nichol & Dhariwal (2021), "Improved DDPM", eq. 17, clipped at 0.999.
    """
    if timesteps < 1:
        raise ValueError(f"a schedule needs at least one timestep, got {timesteps}")
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        f = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        f = f / f[0]
        return (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown beta schedule {schedule!r} (expected linear, sqrt_linear, sqrt or cosine)")


class DiffusionSchedule:
    """A discrete DDPM schedule: ``alphas_cumprod`` (float64, CPU) and the grids derived from it."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must decrease strictly with the timestep")
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "DiffusionSchedule":
        """The schedule a CompVis config describes (``timesteps``, ``linear_start/end``, ``beta_schedule``)."""
        betas = make_betas(cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end)
        return cls(torch.cumprod(1 - betas, dim=0))

    def matches_buffer(self, buffer: Tensor) -> bool:
        """Whether a checkpoint's stored ``alphas_cumprod`` is this schedule up to the rounding of its dtype.

        Both sides are rounded to the buffer's dtype and may then differ by one unit in the last place
        (CompVis stores float32 computed in float64; converters cast that again to fp16 or bf16).
        """
        if buffer.shape != self.alphas_cumprod.shape or not buffer.is_floating_point():
            return False
        stored = buffer.detach().to(device="cpu", dtype=torch.float64)
        expected = self.alphas_cumprod.to(buffer.dtype).to(torch.float64)
        ulp = torch.finfo(buffer.dtype).eps * expected.abs()
        return bool(((stored - expected).abs() <= ulp).all())

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def betas(self) -> Tensor:
        """``beta_t = 1 - a_t / a_{t-1}`` (``beta_0 = 1 - a_0``), recovered from ``alphas_cumprod``."""
        ac = self.alphas_cumprod
        return 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])

    # ---- DDIM grid (ddim, plms) -------------------------------------------------------------------------

    def ddim_timesteps(self, steps: int) -> list[int]:
        """CompVis' uniform DDIM timesteps, ascending: ``range(0, T, T // steps) + 1`` (see module docstring).

        Where that reaches timestep T (steps = 3, 9, 27, 101..., where CompVis fails with an IndexError) the
        out-of-range last one is dropped: 3 steps walk 667, 334, 1, as diffusers' "leading" spacing does.
        """
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_timesteps}, got {steps}")
        stride = self.num_timesteps // steps
        return [t + 1 for t in range(0, self.num_timesteps, stride) if t + 1 < self.num_timesteps]

    def ddim_levels(self, steps: int) -> list[int]:
        """The DDIM walk, descending, ending with the final level 0 (``alphas_prev[0] = alphas_cumprod[0]``).

        Step ``i`` goes from timestep ``levels[i]`` to ``levels[i + 1]``; there are ``len(levels) - 1`` steps.
        """
        return self.ddim_timesteps(steps)[::-1] + [0]

    def alpha_bar(self, t: float) -> float:
        """``alphas_cumprod[t]``; between integer timesteps its log interpolates linearly (the webui's UniPC
        ``NoiseScheduleVP("discrete")``)."""
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        if not 0 <= t <= self.num_timesteps - 1:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        low = math.floor(t)
        w = t - low
        log = self.alphas_cumprod[low : low + 2].log()
        return math.exp((1 - w) * float(log[0]) + w * float(log[1]))

    # ---- k-diffusion sigma grid (euler, heun, dpm2, lms, dpm_solver, ...) ------------------------------

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma at a (fractional) timestep: linear interpolation of log-sigma between integer timesteps."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < 0) | (t > self.num_timesteps - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """The (fractional) timestep of a sigma: the inverse of :meth:`t_to_sigma`, clamped to [0, T - 1]."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        dists = log_sigma.unsqueeze(0) - self.log_sigmas.reshape(-1, *([1] * log_sigma.ndim))
        # Index of the last schedule entry at or below sigma (log_sigmas increase with t).
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.num_timesteps - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def get_sigmas(self, steps: int) -> Tensor:
        """``steps`` sigmas at ``t = linspace(T - 1, 0, steps)`` then 0: the k-diffusion grid (float64, [steps+1])."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        t = torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])
