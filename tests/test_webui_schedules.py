"""Schedule types and the DPM-Solver samplers against k-diffusion's own ``get_sigmas_*`` and ``sample_*``, and
the webui v1.10's schedule formulas (``modules/sd_schedulers.py``) written over k-diffusion's ``CompVisDenoiser``.

k-diffusion computes in float32, this project in float64: schedules agree within float32 rounding; levels
that are the model's own sigmas or the published Align Your Steps list are pinned exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ldm.samplers import SAMPLERS, find_sampler, resolve_schedule, sample, walk_levels
from ldm.samplers.dpm_fast import fast_step_levels
from ldm.samplers.noise import SeededNoise
from ldm.samplers.schedules import ALIGN_YOUR_STEPS_SD15, SCHEDULE_NAMES, model_sigma_range, schedule_levels
from tests.test_dpm2_webui_grid import SHAPE, InnerModel, Recorder, eps_model, k_diffusion, schedule  # noqa: F401


@pytest.fixture(scope="module")
def denoiser(k_diffusion, schedule, eps_model):
    return k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))


def webui_levels(name, n, denoiser, kd):
    """The webui's sd_schedulers functions, over the float32 CompVisDenoiser as the webui calls them."""
    smin, smax = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    if name == "uniform":
        return denoiser.get_sigmas(n)
    if name == "karras":
        return kd.sampling.get_sigmas_karras(n, smin, smax, rho=7.0)
    if name == "exponential":
        return kd.sampling.get_sigmas_exponential(n, smin, smax)
    if name == "polyexponential":
        return kd.sampling.get_sigmas_polyexponential(n, smin, smax, rho=1.0)
    start, end = denoiser.sigma_to_t(torch.tensor(smax)), denoiser.sigma_to_t(torch.tensor(smin))
    if name in ("sgm_uniform", "normal"):
        ts = torch.linspace(start, end, n + 1)[:-1] if name == "sgm_uniform" else torch.linspace(start, end, n)
        return torch.tensor([denoiser.t_to_sigma(t).item() for t in ts] + [0.0])
    if name == "kl_optimal":
        i = torch.arange(n + 1)
        return torch.tan(i / n * torch.arctan(torch.tensor(smin)) + (1.0 - i / n) * torch.arctan(torch.tensor(smax)))
    if name == "align_your_steps":
        ys = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(ALIGN_YOUR_STEPS_SD15[::-1])))
        return torch.tensor([*(list(ALIGN_YOUR_STEPS_SD15) if n == 11 else ys[::-1].tolist()), 0.0])
    if name == "simple":
        ss = len(denoiser.sigmas) / n
        return torch.tensor([denoiser.sigmas[-(1 + int(x * ss))].item() for x in range(n)] + [0.0])
    if name == "ddim":
        ss, sigs, x = max(len(denoiser.sigmas) // n, 1), [], 1
        while x < len(denoiser.sigmas):
            sigs, x = sigs + [denoiser.sigmas[x].item()], x + ss
        return torch.tensor(sigs[::-1] + [0.0])
    assert name == "beta"
    ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
    return torch.tensor([smin + x * (smax - smin) for x in ts] + [0.0])


@pytest.mark.parametrize("n", [1, 4, 11, 20])
@pytest.mark.parametrize("name", [s for s in SCHEDULE_NAMES if s != "automatic"])
def test_schedule_equals_the_webuis(k_diffusion, denoiser, schedule, name, n):
    if n == 1 and name in ("kl_optimal",):
        n = 2
    ours = torch.tensor(schedule_levels(name, schedule, n), dtype=torch.float64)
    # sigma_min and sigma_max are the webui's (float32) ones; the levels read at timesteps are float64 here
    fixed_ends = name not in ("uniform", "sgm_uniform", "simple", "normal", "ddim")
    expected = webui_levels(name, n, denoiser, k_diffusion).double()
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=2e-6 if fixed_ends else 2e-5, atol=0)


def test_schedule_levels_pinned_where_they_are_exact(schedule):
    sigmas = schedule.sigmas.tolist()
    assert schedule_levels("ddim", schedule, 5) == [sigmas[t] for t in (801, 601, 401, 201, 1)] + [0.0]
    assert schedule_levels("simple", schedule, 4) == [sigmas[t] for t in (999, 749, 499, 249)] + [0.0]
    assert schedule_levels("uniform", schedule, 7) == schedule.get_sigmas(7).tolist()
    assert schedule_levels("align_your_steps", schedule, 11) == [*ALIGN_YOUR_STEPS_SD15, 0.0]
    smin, smax = model_sigma_range(schedule)
    assert (np.float32(smin), np.float32(smax)) == (np.float32(0.029167535), np.float32(14.614642))  # float32 ends
    assert schedule_levels("karras", schedule, 10)[-2:] == [pytest.approx(smin, rel=1e-14), 0.0]
    assert schedule_levels("exponential", schedule, 10)[0] == pytest.approx(smax, rel=1e-14)
    assert schedule_levels("kl_optimal", schedule, 10)[-1] == pytest.approx(smin, rel=1e-14)  # no 0: the webui's


def test_automatic_is_each_samplers_webui_default(schedule):
    assert {name: resolve_schedule(name, "automatic") for name in SAMPLERS if SAMPLERS[name].automatic != "uniform"} \
        == {"dpmpp_2m": "karras", "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2s_a": "karras", "dpmpp_sde": "karras",
            "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential",
            "restart": "karras"}
    assert walk_levels("dpm_solver", schedule, 6) == schedule_levels("karras", schedule, 6)
    assert walk_levels("euler", schedule, 6) == schedule.get_sigmas(6).tolist()
    karras = schedule_levels("karras", schedule, 7)
    assert walk_levels("dpm2", schedule, 6) == karras[:-2] + karras[-1:]  # discard_next_to_last_sigma
    assert walk_levels("ddim", schedule, 5, schedule_type="karras") == schedule.ddim_levels(5)


@pytest.mark.parametrize("name, expected", [
    ("dpm_solver", ("dpmpp_2m", None)), ("DPM++ 2M", ("dpmpp_2m", None)), ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("DPM2 a Karras", ("dpm2_a", "karras")), ("LMS Karras", ("lms", "karras")), ("Euler a", ("euler_a", None)),
    ("k_dpmpp_2s_a", ("dpmpp_2s_a", None)), ("DPM++ 2S a Karras", ("dpmpp_2s_a", "karras")),
    ("Euler SGMUniform", ("euler", "sgm_uniform")), ("dpm++ 2m", None), ("DPM++ 2M Automatic", None),
    ("UniPC", ("unipc", None)), ("Restart", ("restart", None)), ("LCM", ("lcm", None)),
])
def test_find_sampler_takes_the_webuis_labels(name, expected):
    found = find_sampler(name)
    assert (None if found is None else (found[0].name, found[1])) == expected


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("schedule_type", ["automatic", "uniform", "exponential"])
def test_dpmpp_2m_equals_k_diffusion(k_diffusion, denoiser, schedule, eps_model, steps, schedule_type):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    sigmas = torch.tensor(walk_levels("dpmpp_2m", schedule, steps, 1.0, schedule_type), dtype=torch.float32)
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, disable=True)
    got = sample("dpmpp_2m", eps_model, schedule, noise, steps, schedule_type=schedule_type)
    _assert_close(got, expected)


@pytest.mark.parametrize("steps", [4, 10])
def test_dpmpp_2s_a_equals_k_diffusion_given_the_same_noise(k_diffusion, denoiser, schedule, eps_model, steps):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    sigmas = torch.tensor(walk_levels("dpmpp_2s_a", schedule, steps), dtype=torch.float32)
    draws = Recorder(9)
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_dpmpp_2s_ancestral(
            denoiser, noise * sigmas[0], sigmas, disable=True, noise_sampler=lambda s, s_next: draws(noise))
    got = sample("dpmpp_2s_a", eps_model, schedule, noise, steps, noise_sampler=Recorder(9))
    _assert_close(got, expected)


@pytest.mark.parametrize("steps, strength", [(4, 1.0), (9, 1.0), (10, 1.0), (11, 1.0), (10, 0.6)])
def test_dpm_fast_equals_k_diffusion_as_the_webui_calls_it(k_diffusion, denoiser, schedule, eps_model, steps, strength):
    """txt2img: the model's sigma_min and sigma_max, n = steps, eta 1 (the webui's default); img2img: the ends of
    the cut walk (sigma_sched[0] and [-2]) and its length."""
    noise = SeededNoise([5, 6]).initial(SHAPE)
    init = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    levels = walk_levels("dpm_fast", schedule, steps, strength)
    x = noise * levels[0] if strength == 1 else init + levels[0] * noise
    draws = Recorder(9)
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_dpm_fast(
            denoiser, x, levels[-2], levels[0], len(levels) - 1, disable=True, eta=1.0,
            noise_sampler=lambda s, s_next: draws(noise))
    seen = []
    got = sample("dpm_fast", eps_model, schedule, noise, steps, noise_sampler=Recorder(9), strength=strength,
                 init_latent=None if strength == 1 else init, callback=lambda i, total, x: seen.append(total))
    _assert_close(got, expected)
    assert seen == [len(fast_step_levels(levels)) - 1] * seen[0]  # steps of up to 3 model calls


def _assert_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))
