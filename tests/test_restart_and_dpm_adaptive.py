"""``restart`` and ``dpm_adaptive`` as the webui runs them.

``dpm_adaptive``'s oracle is k-diffusion's ``sample_dpm_adaptive``, called as the webui calls it (the walk's
ends, eta 1 by default). k-diffusion 0.1.1 has no restart sampler: ``restart``'s oracle is a transcription,
here, of the webui's ``modules/sd_samplers_extra.py::restart_sampler`` with its automatic restart list, over
k-diffusion's float32 ``get_sigmas_karras``, ``to_d`` and ``CompVisDenoiser``.
"""

from __future__ import annotations

import pytest
import torch

from ldm.errors import UsageError
from ldm.pipeline.inpainting import sampler_blend
from ldm.samplers import SAMPLERS, find_sampler, sample, walk_levels
from ldm.samplers.noise import SeededNoise
from ldm.samplers.restart import restart_plan, restart_step_levels
from tests.test_dpm2_webui_grid import SHAPE, InnerModel, Recorder, eps_model, k_diffusion, schedule  # noqa: F401


@pytest.fixture(scope="module")
def denoiser(k_diffusion, schedule, eps_model):
    return k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))


def _assert_close(got, expected):  # the tolerance of tests/test_webui_schedules.py
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))


def _start(levels, strength, noise):
    init = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    x = noise * levels[0] if strength == 1 else init + levels[0] * noise
    return x, None if strength == 1 else init


# ---- dpm_adaptive ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, strength, eta", [(10, 1.0, 1.0), (10, 1.0, 0.0), (30, 1.0, 1.0), (10, 0.6, 1.0)])
def test_dpm_adaptive_equals_k_diffusion_as_the_webui_calls_it(k_diffusion, denoiser, schedule, eps_model, steps,
                                                             strength, eta):
    """txt2img: the model's sigma_min and sigma_max whatever the step count; img2img: the cut walk's ends."""
    noise = SeededNoise([5, 6]).initial(SHAPE)
    levels = walk_levels("dpm_adaptive", schedule, steps, strength)
    x, init = _start(levels, strength, noise)
    draws = Recorder(9)
    with torch.no_grad():
        expected, info = k_diffusion.sampling.sample_dpm_adaptive(
            denoiser, x, levels[-2], levels[0], disable=True, eta=eta, noise_sampler=lambda s, s_next: draws(noise),
            return_info=True)
    seen = []
    got = sample("dpm_adaptive", eps_model, schedule, noise, steps, noise_sampler=Recorder(9), strength=strength,
                 init_latent=init, ancestral_eta=eta, callback=lambda i, total, x: seen.append((i, total)))
    _assert_close(got, expected)
    assert seen == [(i, 0) for i in range(info["n_accept"])]  # one report per accepted step, total unknown
    assert info["n_accept"] > 3


def test_dpm_adaptive_ignores_the_step_count(schedule, eps_model):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    assert torch.equal(sample("dpm_adaptive", eps_model, schedule, noise, 7, noise_sampler=Recorder(9)),
                       sample("dpm_adaptive", eps_model, schedule, noise, 31, noise_sampler=Recorder(9)))


def test_dpm_adaptive_has_no_blend_for_a_4_channel_inpainting(schedule):
    latent = torch.zeros(1, *SHAPE)
    with pytest.raises(UsageError, match="--sampler dpm_adaptive cannot inpaint with a 4-channel checkpoint"):
        sampler_blend("dpm_adaptive", schedule, 10, 1.0, latent, torch.ones(1, 1, 8, 8), latent)


# ---- restart --------------------------------------------------------------------------------------------------


def webui_restart(kd, model, x, sigmas, randn_like):
    """The webui's ``restart_sampler`` with ``restart_list=None`` and ``s_noise=1``, transcribed."""
    steps = len(sigmas) - 1
    restarts = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = kd.sampling.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(),
                                               sigmas[0].item())
        low, high = int(torch.argmin((sigmas - 0.1).abs())), int(torch.argmin((sigmas - 2).abs()))
        if high < low:
            between = kd.sampling.get_sigmas_karras(restart_steps + 1, sigmas[low].item(), sigmas[high].item())[:-1]
            restarts[low] = list(zip(between[:-1], between[1:])) * restart_times
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs += [(sigmas[i], sigmas[i + 1]), *restarts.get(i + 1, [])]
    ones, last = x.new_ones([x.shape[0]]), None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + randn_like(x) * (old**2 - last**2) ** 0.5
        d = kd.sampling.to_d(x, old, model(x, old * ones))
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            x = x + (d + kd.sampling.to_d(x_2, new, model(x_2, new * ones))) / 2 * (new - old)
        last = new
    return x, len(pairs)


@pytest.mark.parametrize("steps, strength", [(8, 1.0), (20, 1.0), (27, 1.0), (40, 1.0), (40, 0.6)])
def test_restart_equals_the_webuis(k_diffusion, denoiser, schedule, eps_model, steps, strength):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    levels = walk_levels("restart", schedule, steps, strength)
    x, init = _start(levels, strength, noise)
    draws = Recorder(9)
    with torch.no_grad():
        expected, pairs = webui_restart(k_diffusion, denoiser, x, torch.tensor(levels, dtype=torch.float32),
                                        lambda like: draws(noise))
    seen = []
    got = sample("restart", eps_model, schedule, noise, steps, noise_sampler=Recorder(9), strength=strength,
                 init_latent=init, callback=lambda i, total, x: seen.append((i, total)))
    _assert_close(got, expected)
    assert seen == [(i, pairs) for i in range(pairs)]


def test_restart_under_20_steps_is_heun(k_diffusion, denoiser, schedule, eps_model):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    sigmas = torch.tensor(walk_levels("restart", schedule, 12), dtype=torch.float32)
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_heun(denoiser, noise * sigmas[0], sigmas, disable=True)
    _assert_close(sample("restart", eps_model, schedule, noise, 12), expected)


def test_restart_plan_goes_back_up_between_01_and_2(schedule):
    levels = walk_levels("restart", schedule, 40)
    plan = restart_plan(levels)
    assert len(plan) == 40  # 20 main steps, then 2 restarts of 10
    ups = [i for i in range(1, len(plan)) if plan[i][0] > plan[i - 1][1]]
    assert len(ups) == 2
    for i in ups:
        assert plan[i][0] == pytest.approx(2, rel=0.3) and plan[i - 1][1] == pytest.approx(0.1, rel=0.3)
    assert plan[-1][1] == 0 and plan[0][0] == pytest.approx(levels[0])
    assert restart_step_levels(levels) == [plan[0][0], *(end for _, end in plan)]


def test_restart_inpainting_blend_follows_its_steps(schedule):
    latent = torch.zeros(1, *SHAPE)
    blend = sampler_blend("restart", schedule, 24, 1.0, latent, torch.ones(1, 1, 8, 8), latent)
    assert blend.levels == restart_step_levels(walk_levels("restart", schedule, 24))
    assert blend.steps == len(restart_plan(walk_levels("restart", schedule, 24)))


def test_the_webuis_names():
    assert find_sampler("Restart") == (SAMPLERS["restart"], None)
    assert find_sampler("DPM adaptive") == (SAMPLERS["dpm_adaptive"], None)
    assert find_sampler("k_dpm_ad")[0].name == find_sampler("k_dpm_adaptive")[0].name == "dpm_adaptive"
    assert SAMPLERS["restart"].automatic == "karras" and SAMPLERS["dpm_adaptive"].adaptive
