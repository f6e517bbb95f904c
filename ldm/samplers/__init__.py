"""Samplers: one entry point, :func:`sample`, over one small function per sampler.

- ``ddim``: DDIM with the caller's eta (ddim.py), over CompVis' DDIM timesteps; 1 model call a step.
- ``lcm``: latent consistency model sampling (ddim.py), diffusers' ``LCMScheduler``: for LCM-LoRAs and
  LCM-distilled checkpoints (4 to 8 steps, scale 1 to 2); 1 call a step, fresh noise between steps, at most 50 steps.
- ``plms``: PLMS (plms.py), same timesteps; 1 call a step, 2 in the first.
- ``unipc``: UniPC-bh1 of order 3 with data prediction (unipc.py), the webui's defaults, over timesteps evenly
  spaced from 999 to 0 (fractional); 1 call a step, 2 in the first, none after the last.
- ``dpmpp_2m`` (also ``dpm_solver``): DPM-Solver++(2M) (dpm_solver.py); 1 call a step.
- ``dpmpp_2s_a``: DPM-Solver++(2S) ancestral (dpm_solver.py); 2 calls a step, 1 in the last.
- ``dpm_fast``: DPM-Solver of order 3 with fixed steps (dpm_fast.py); ``steps`` calls in about steps / 3 steps.
- ``dpm_adaptive``: DPM-Solver-23 with adaptive steps (dpm_fast.py); 3 calls a step, ignores ``steps``.
- ``restart``: restart sampling (restart.py), Heun steps with the webui's restart segments from 20 steps on.
- ``euler``, ``euler_a``: Euler and Euler ancestral (k_diffusion.py); 1 call a step.
- ``heun``: Heun; 2 calls a step, 1 in the last.
- ``dpm2``, ``dpm2_a``: DPM-Solver-2-style midpoint steps, plain and ancestral; 2 calls a step, 1 in the last.
- ``lms``: linear multistep, order 4; 1 call a step.
- ``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_2m_sde_heun``, ``dpmpp_3m_sde``: the DPM-Solver++ SDE samplers
  (sde.py), their noise from one Brownian tree per image as the webui draws it; ``dpmpp_3m_sde`` walks the
  DPM2 grid (the next-to-last sigma dropped, as the webui).

Each sampler is one :class:`Sampler` record in :data:`SAMPLERS` (its name, the webui's label, the function,
its grid, its fixed options, its ``automatic`` schedule): the scripts' names, this dispatcher and the images'
metadata all read it. Grids (:mod:`ldm.samplers.grids`): the DDIM one is CompVis' ``range(0, 1000, 1000 //
steps) + 1`` (more than ``steps`` timesteps when ``steps`` does not divide 1000, as CompVis); the sigma one
is the levels of a schedule type (:mod:`ldm.samplers.schedules`), ``automatic`` standing for the sampler's
webui default (Karras for DPM++ 2M, DPM++ 2S a, DPM++ SDE, DPM2, DPM2 a and Restart; Exponential for the DPM++
2M and 3M SDE ones; uniform, k-diffusion's ``get_sigmas(steps)``, for the others); ``dpm2``, ``dpm2_a`` and
``dpmpp_3m_sde`` walk it for ``steps + 1`` with the next-to-last sigma dropped, as AUTOMATIC1111's webui does;
``unipc`` walks the webui's time-uniform timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ldm.samplers import ddim, dpm_fast, dpm_solver, k_diffusion, plms, restart, sde, unipc
from ldm.samplers.common import Callback, EpsModel, NoiseSampler, ScheduledEps
from ldm.samplers.grids import (LCM_TIMESTEPS, SIGMAS, SIGMAS_WITHOUT_PENULTIMATE, TIME_UNIFORM, TIMESTEPS, SigmaGrid,
                                TimestepGrid)
from ldm.samplers.schedule import DiffusionSchedule
from ldm.samplers.schedules import SCHEDULES, find_schedule

__all__ = ["HIRES_STEPS", "SAMPLERS", "SAMPLER_NAMES", "Sampler", "find_sampler", "resolve_schedule", "sample", "sampler_record",
           "walk_levels"]


@dataclass(frozen=True)
class Sampler:
    """Everything about one sampler: the name the scripts take, the name AUTOMATIC1111 writes in its
    infotext (so its parser maps it back), the function (see :mod:`ldm.samplers.common` for the calling
    convention), the grid it walks, its fixed options, whether it takes the caller's DDIM eta, the schedule
    type ``automatic`` means for it (the webui's default for it), further names ``--sampler`` takes, and, for
    a sampler whose steps do not end on its walk's levels, the levels they end at (``step_levels(walk)``,
    first the start: what inpainting's blend follows), and whether it picks its steps as it goes (``adaptive``:
    it ignores the step count, and a 4-channel inpainting blend cannot follow it)."""

    name: str
    label: str
    function: Callable[..., Tensor]
    grid: TimestepGrid | SigmaGrid
    options: tuple[tuple[str, float], ...] = ()
    takes_eta: bool = False
    automatic: str = "uniform"
    aliases: tuple[str, ...] = ()
    step_levels: Callable[[list[float]], list[float]] | None = None
    adaptive: bool = False


_SDE_ETA = (("eta", 1.0),)  # the SDE samplers' noise amount; --eta replaces it (see ``sample``)
SDE_SAMPLERS = (
    Sampler("dpmpp_sde", "DPM++ SDE", sde.sample_dpmpp_sde, SIGMAS, _SDE_ETA, automatic="karras"),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", sde.sample_dpmpp_2m_sde, SIGMAS, _SDE_ETA, automatic="exponential"),
    Sampler("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", partial(sde.sample_dpmpp_2m_sde, solver_type="heun"), SIGMAS,
            _SDE_ETA, automatic="exponential"),
    Sampler("dpmpp_3m_sde", "DPM++ 3M SDE", sde.sample_dpmpp_3m_sde, SIGMAS_WITHOUT_PENULTIMATE, _SDE_ETA,
            automatic="exponential"),
)
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddim", "DDIM", ddim.sample_ddim, TIMESTEPS, takes_eta=True),
        Sampler("plms", "PLMS", plms.sample_plms, TIMESTEPS),
        Sampler("unipc", "UniPC", unipc.sample_unipc, TIME_UNIFORM),
        Sampler("dpmpp_2m", "DPM++ 2M", dpm_solver.sample_dpmpp_2m, SIGMAS, automatic="karras",
                aliases=("dpm_solver", "k_dpmpp_2m")),
        Sampler("euler", "Euler", k_diffusion.sample_euler, SIGMAS, aliases=("k_euler",)),
        Sampler("euler_a", "Euler a", k_diffusion.sample_euler, SIGMAS, options=(("eta", 1.0),),
                aliases=("k_euler_a", "k_euler_ancestral")),
        Sampler("heun", "Heun", k_diffusion.sample_heun, SIGMAS, aliases=("k_heun",)),
        Sampler("dpm2", "DPM2", k_diffusion.sample_dpm2, SIGMAS_WITHOUT_PENULTIMATE, automatic="karras",
                aliases=("k_dpm_2",)),
        Sampler("dpm2_a", "DPM2 a", k_diffusion.sample_dpm2, SIGMAS_WITHOUT_PENULTIMATE, options=(("eta", 1.0),),
                automatic="karras", aliases=("k_dpm_2_a",)),
        Sampler("lms", "LMS", k_diffusion.sample_lms, SIGMAS, aliases=("k_lms",)),
        Sampler("dpmpp_2s_a", "DPM++ 2S a", dpm_solver.sample_dpmpp_2s_ancestral, SIGMAS, options=(("eta", 1.0),),
                automatic="karras", aliases=("k_dpmpp_2s_a",)),
        Sampler("dpm_fast", "DPM fast", dpm_fast.sample_dpm_fast, SIGMAS, options=(("eta", 1.0),),
                aliases=("k_dpm_fast",), step_levels=dpm_fast.fast_step_levels),
        Sampler("dpm_adaptive", "DPM adaptive", dpm_fast.sample_dpm_adaptive, SIGMAS, options=(("eta", 1.0),),
                aliases=("k_dpm_ad", "k_dpm_adaptive"), adaptive=True),
        Sampler("restart", "Restart", restart.sample_restart, SIGMAS, options=(("s_noise", 1.0),), automatic="karras",
                aliases=("k_restart",), step_levels=restart.restart_step_levels),
        *SDE_SAMPLERS,
        Sampler("lcm", "LCM", ddim.sample_lcm, LCM_TIMESTEPS, options=(("s_noise", 1.0),)),
    )
}
SAMPLER_NAMES = tuple(SAMPLERS)
IMG2IMG_STEPS = ("cut", "webui")  # how --strength picks img2img's steps (walk_levels)
HIRES_STEPS = "hires"  # the webui's hires pass: exactly ``steps`` steps of a longer walk (walk_levels)


def find_sampler(name: str) -> tuple[Sampler, str | None] | None:
    """The sampler a name means and the schedule type it names, or None: a name (``"dpmpp_2m"``), an alias
    (``"dpm_solver"``, the webui's ``"k_dpmpp_2m"``), a webui label (``"DPM++ 2M"``) or an old webui label
    that names a schedule (``"DPM++ 2M Karras"``: ``(dpmpp_2m, "karras")``). Case-sensitive, as the webui."""
    for record in SAMPLERS.values():
        if name in (record.name, record.label, *record.aliases):
            return record, None
    base, _, suffix = name.rpartition(" ")
    schedule = find_schedule(suffix) if base else None
    found = find_sampler(base) if schedule is not None and schedule.function is not None else None
    if found is None or found[1] is not None:
        return None
    return found[0], schedule.name


def resolve_schedule(name: str, schedule_type: str) -> str:
    """The schedule type sampler ``name`` walks: ``automatic`` is the sampler's own default."""
    if schedule_type not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule_type!r}; valid schedules: {', '.join(SCHEDULES)}")
    return sampler_record(name).automatic if schedule_type == "automatic" else schedule_type


def sampler_record(name: str) -> Sampler:
    """The record of the sampler ``name`` means (a name, an alias or a label); a label that names a schedule, or
    no sampler at all, is a ValueError."""
    found = find_sampler(name)
    if found is None or found[1] is not None:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return found[0]


@torch.no_grad()
def sample(
    name: str,
    eps_model: EpsModel,
    schedule: DiffusionSchedule,
    noise: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    ancestral_eta: float = 1.0,
    init_latent: Tensor | None = None,
    strength: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
    schedule_type: str = "automatic",
    img2img_steps: str = "cut",
) -> Tensor:
    """Sample latents with sampler ``name`` from ``noise`` (txt2img) or ``init_latent`` (img2img).

    Args:
        name: one of :data:`SAMPLER_NAMES` or an alias (``dpm_solver``).
        eps_model: ``eps_model(x, t) -> eps``, ``t`` a float32 tensor ``[B]`` (usually a
            :class:`ldm.samplers.guidance.GuidedDenoiser`).
        schedule: the model's :class:`ldm.samplers.schedule.DiffusionSchedule`.
        noise: standard-normal noise ``[B, C, h, w]`` (e.g. ``SeededNoise.initial``). txt2img starts from it
            (``ddim``/``plms``/``unipc``: ``x_T = noise``, as CompVis; k-samplers: ``sigma_max * noise``); img2img
            adds it to ``init_latent``. The latent keeps ``noise``'s dtype and device.
        steps: number of steps (``ddim``/``plms``: CompVis' DDIM spacing, which walks more timesteps than
            ``steps`` when ``steps`` does not divide 1000).
        eta: DDIM's eta (0 deterministic, 1 DDPM-like); must be 0 for the other samplers.
        ancestral_eta: the noise amount of the samplers with an ``eta`` option (``euler_a``, ``dpm2_a``, the SDE
            samplers; the webui's ``Eta``, default 1; 0 makes them deterministic); the others ignore it.
        init_latent: img2img: the encoded image latent ``[B, C, h, w]``.
        strength: img2img: how much of the walk to redo. ``int(strength * steps)`` steps run (CompVis'
            ``t_enc``), the last ones of the full walk, starting from ``init_latent`` noised with ``noise`` to
            the level of the first of them (``sqrt(a) x0 + sqrt(1 - a) noise``, or ``x0 + sigma noise``).
            0 (or any strength giving 0 steps) returns ``init_latent`` unchanged; 1 is txt2img from ``noise``.
            Unlike CompVis, whose ``stochastic_encode`` noises one DDIM step above where decoding starts, the
            noise level is the one the first step expects.
        noise_sampler: ``noise_sampler(like) -> Tensor`` for the fresh noise of ancestral steps (``euler_a``,
            ``dpm2_a``, ``ddim`` with eta > 0); default ``torch.randn_like``; use ``SeededNoise`` for
            per-image seeds (the SDE samplers read its ``seeds`` and ``rng`` for their Brownian trees).
        callback: ``callback(step, total, x)`` after each step (0-based step, steps in this run, latent).
            Raise from it to stop the run; the exception propagates unchanged.
        schedule_type: the sigma samplers' (:mod:`ldm.samplers.schedules`); ``ddim``/``plms``/``unipc`` ignore it.
        img2img_steps: how ``strength`` picks the steps (:func:`walk_levels`).

    Returns:
        The denoised latent (``ddim``/``plms``/``unipc``: at ``alphas_cumprod[0]``, as CompVis).
    """
    spec = sampler_record(name)
    if eta != 0 and not spec.takes_eta:
        raise ValueError(f"eta={eta} applies only to the ddim sampler, not {name!r}")
    levels = walk_levels(name, schedule, steps, strength, schedule_type, img2img_steps)
    start = _start(spec, schedule, noise, levels, init_latent, strength, img2img_steps)
    if start is None:
        return init_latent.clone()
    x, levels = start
    options = _options(spec, eta, ancestral_eta, noise_sampler, callback)
    options.update(_brownian_span(spec, schedule, steps, schedule_type, init_latent, strength, img2img_steps))
    return spec.function(ScheduledEps(eps_model, schedule), x, levels, **options)


def _options(spec: Sampler, eta: float, ancestral_eta: float, noise_sampler: NoiseSampler | None,
             callback: Callback | None) -> dict:
    """The sampler function's keyword options: its fixed ones, the eta it takes, the noise sampler when noisy
    (an eta above 0, or ``restart``'s noise scale ``s_noise``)."""
    options = dict(spec.options, callback=callback)
    if "eta" in options:
        options["eta"] = ancestral_eta
    if spec.takes_eta:
        options["eta"] = eta
    if options.get("eta", 0) > 0 or options.get("s_noise", 0) > 0:
        options["noise_sampler"] = noise_sampler or torch.randn_like
    return options


def _brownian_span(spec: Sampler, schedule: DiffusionSchedule, steps: int, schedule_type: str,
                   init_latent: Tensor | None = None, strength: float = 1.0, img2img_steps: str = "cut") -> dict:
    """An SDE sampler's ``span`` in img2img: the webui builds its Brownian trees over the whole schedule, not the
    tail it walks (``create_noise_sampler(x, sigmas, p)`` in ``sample_img2img``; the hires pass's whole schedule is
    the longer one its steps are the tail of)."""
    if spec not in SDE_SAMPLERS or init_latent is None:
        return {}
    if img2img_steps == HIRES_STEPS:
        steps = max(int(steps / min(strength, 0.999)), 1)
    whole = walk_levels(spec.name, schedule, steps, 1.0, schedule_type)
    return {"span": (min(s for s in whole if s > 0), max(whole))}


def _start(spec: Sampler, schedule: DiffusionSchedule, noise: Tensor, levels: list[float], init_latent: Tensor | None,
           strength: float, img2img_steps: str = "cut") -> tuple[Tensor, list[float]] | None:
    """The latent the walk starts from and the levels it walks; None when img2img has no step to run."""
    if init_latent is None and strength != 1:
        raise ValueError(f"strength={strength} needs an init_latent (img2img)")
    if init_latent is not None:
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if init_latent.shape != noise.shape:
            raise ValueError(f"init_latent {tuple(init_latent.shape)} and noise {tuple(noise.shape)} differ in shape")
    if init_latent is None or (strength == 1 and img2img_steps == "cut"):  # the webui noises the image even at 1
        return spec.grid.start(noise, levels[0]), levels
    if len(levels) == 1:
        return None
    return spec.grid.noised(schedule, init_latent.to(noise.dtype), noise, levels[0]), levels


def walk_levels(name: str, schedule: DiffusionSchedule, steps: int, strength: float = 1.0,
                schedule_type: str = "automatic", img2img_steps: str = "cut") -> list[float]:
    """The levels sampler ``name`` walks for ``steps`` steps at img2img ``strength`` on ``schedule_type``: its
    whole grid, or the tail of it (one level alone: no step to run). ``img2img_steps``: ``cut`` runs the last
    ``int(strength * steps)`` steps (CompVis' ``t_enc``); ``webui`` the last ``int(min(strength, 0.999) * steps)
    + 1``, as AUTOMATIC1111's img2img does (``sigmas[steps - t_enc - 1:]``); ``hires`` exactly ``steps`` steps,
    the tail of the walk for ``int(steps / min(strength, 0.999))`` (the webui's ``setup_img2img_steps`` given
    the hires pass's steps: ``t_enc = steps - 1``)."""
    if img2img_steps == HIRES_STEPS:
        longer = int(steps / min(strength, 0.999)) if strength > 0 else 0
        levels = sampler_record(name).grid.levels(schedule, max(longer, 1), resolve_schedule(name, schedule_type))
        return levels[-(min(steps, len(levels) - 1) + 1):] if strength > 0 else levels[-1:]
    if img2img_steps not in IMG2IMG_STEPS:
        raise ValueError(f"img2img_steps must be one of {', '.join(IMG2IMG_STEPS)}, got {img2img_steps!r}")
    levels = sampler_record(name).grid.levels(schedule, steps, resolve_schedule(name, schedule_type))
    if strength == 1:
        return levels
    run = int(min(strength, 0.999) * steps) + 1 if img2img_steps == "webui" else int(strength * steps)
    run = min(run, len(levels) - 1)
    return levels[-(run + 1):]
