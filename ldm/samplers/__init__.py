"""Samplers: one entry point, :func:`sample`, over one small function per sampler.

- ``ddim``: DDIM with the caller's eta (ddim.py), over CompVis' DDIM timesteps; 1 model call a step.
- ``plms``: PLMS (plms.py), same timesteps; 1 call a step, 2 in the first.
- ``dpm_solver``: DPM-Solver++(2M) (dpm_solver.py), over k-diffusion sigmas; 1 call a step.
- ``euler``, ``euler_a``: Euler and Euler ancestral (k_diffusion.py); 1 call a step.
- ``heun``: Heun; 2 calls a step, 1 in the last.
- ``dpm2``, ``dpm2_a``: DPM-Solver-2-style midpoint steps, plain and ancestral; 2 calls a step, 1 in the last.
- ``lms``: linear multistep, order 4; 1 call a step.

Grids (see :mod:`ldm.schedule`): the DDIM one is CompVis' ``range(0, 1000, 1000 // steps) + 1`` (more than
``steps`` timesteps when ``steps`` does not divide 1000, as CompVis); the sigma one is k-diffusion's
``get_sigmas(steps)``, ``steps`` timesteps evenly spaced from 999 to 0, then sigma 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ldm.samplers import ddim, dpm_solver, k_diffusion, plms
from ldm.samplers.common import Callback, EpsModel, NoiseSampler
from ldm.schedule import DiffusionSchedule

__all__ = ["SAMPLER_NAMES", "sample"]

SAMPLER_NAMES = ("ddim", "plms", "dpm_solver", "euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms")

# name: (grid, sampler function, fixed options). "ddim" grid = timesteps over eps; "sigmas" = k-diffusion.
_SAMPLERS = {
    "ddim": ("ddim", ddim.sample_ddim, {}),
    "plms": ("ddim", plms.sample_plms, {}),
    "dpm_solver": ("sigmas", dpm_solver.sample_dpmpp_2m, {}),
    "euler": ("sigmas", k_diffusion.sample_euler, {}),
    "euler_a": ("sigmas", k_diffusion.sample_euler, {"eta": 1.0}),
    "heun": ("sigmas", k_diffusion.sample_heun, {}),
    "dpm2": ("sigmas", k_diffusion.sample_dpm2, {}),
    "dpm2_a": ("sigmas", k_diffusion.sample_dpm2, {"eta": 1.0}),
    "lms": ("sigmas", k_diffusion.sample_lms, {}),
}


@torch.no_grad()
def sample(
    name: str,
    eps_model: EpsModel,
    schedule: DiffusionSchedule,
    noise: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    init_latent: Optional[Tensor] = None,
    strength: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callback] = None,
) -> Tensor:
    """Sample latents: ``sample(name, eps_model, schedule, noise, steps, *, eta=0.0, init_latent=None,
    strength=1.0, noise_sampler=None, callback=None) -> Tensor``.

    Args:
        name: one of :data:`SAMPLER_NAMES`.
        eps_model: ``eps_model(x, t) -> eps``, ``t`` a float32 tensor ``[B]`` (usually a
            :class:`ldm.guidance.GuidedDenoiser`).
        schedule: the model's :class:`ldm.schedule.DiffusionSchedule`.
        noise: standard-normal noise ``[B, C, h, w]`` (e.g. ``SeededNoise.initial``). txt2img starts from it
            (``ddim``/``plms``: ``x_T = noise``, as CompVis; k-samplers: ``sigma_max * noise``); img2img adds it
            to ``init_latent``. The latent keeps ``noise``'s dtype and device.
        steps: number of steps (``ddim``/``plms``: CompVis' DDIM spacing, which walks more timesteps than
            ``steps`` when ``steps`` does not divide 1000).
        eta: DDIM's eta (0 deterministic, 1 DDPM-like); must be 0 for the other samplers (``euler_a`` and
            ``dpm2_a`` always use k-diffusion's eta 1).
        init_latent: img2img: the encoded image latent ``[B, C, h, w]``.
        strength: img2img: how much of the walk to redo. ``int(strength * steps)`` steps run (CompVis'
            ``t_enc``), the last ones of the full walk, starting from ``init_latent`` noised with ``noise`` to
            the level of the first of them (``sqrt(a) x0 + sqrt(1 - a) noise``, or ``x0 + sigma noise``).
            0 (or any strength giving 0 steps) returns ``init_latent`` unchanged; 1 is txt2img from ``noise``.
            Unlike CompVis, whose ``stochastic_encode`` noises one DDIM step above where decoding starts, the
            noise level is the one the first step expects.
        noise_sampler: ``noise_sampler(like) -> Tensor`` for the fresh noise of ancestral steps (``euler_a``,
            ``dpm2_a``, ``ddim`` with eta > 0); default ``torch.randn_like``; use ``SeededNoise`` for
            per-image seeds.
        callback: ``callback(step, total, x)`` after each step (0-based step, steps in this run, latent).
            Raise from it to stop the run; the exception propagates unchanged.

    Returns:
        The denoised latent (``ddim``/``plms``: at ``alphas_cumprod[0]``, as CompVis).
    """
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    grid, function, options = _SAMPLERS[name]
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta={eta} applies only to the ddim sampler, not {name!r}")
    if init_latent is None and strength != 1:
        raise ValueError(f"strength={strength} needs an init_latent (img2img)")
    if init_latent is not None:
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if init_latent.shape != noise.shape:
            raise ValueError(f"init_latent {tuple(init_latent.shape)} and noise {tuple(noise.shape)} differ in shape")

    levels = schedule.ddim_levels(steps) if grid == "ddim" else schedule.get_sigmas(steps).tolist()
    if init_latent is None or strength == 1:
        x = noise if grid == "ddim" else noise * levels[0]
    else:
        run = min(int(strength * steps), len(levels) - 1)
        if run == 0:
            return init_latent.clone()
        levels = levels[-(run + 1):]
        x0 = init_latent.to(noise.dtype)
        if grid == "ddim":
            a = schedule.alpha_bar(levels[0])
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        else:
            x = x0 + levels[0] * noise

    kwargs = dict(options, callback=callback)
    if name == "ddim":
        kwargs["eta"] = eta
    if kwargs.get("eta", 0) > 0:
        kwargs["noise_sampler"] = noise_sampler or torch.randn_like
    if grid == "ddim":
        return function(eps_model, x, schedule, levels, **kwargs)
    return function(k_diffusion.EpsDenoiser(eps_model, schedule), x, levels, **kwargs)
