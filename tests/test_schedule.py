"""DiffusionSchedule against CompVis' numbers and diffusers' schedulers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from ldm.config import ScheduleConfig, load_model_config
from ldm.samplers.schedule import DiffusionSchedule, make_betas

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_config(ScheduleConfig())


def test_betas_and_alphas_cumprod_match_diffusers_scaled_linear(schedule):
    ref = DDIMScheduler(**SD)
    np.testing.assert_allclose(schedule.betas.numpy(), ref.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-6)
    assert schedule.alphas_cumprod.dtype == torch.float64


def test_linear_betas_are_linear_in_sqrt_beta_in_float64():
    betas = make_betas("linear", 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    steps = betas.sqrt().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)


def test_schedule_from_the_sd_v1_config(schedule):
    cfg = load_model_config()
    from_yaml = DiffusionSchedule.from_config(cfg.schedule)
    assert torch.equal(from_yaml.alphas_cumprod, schedule.alphas_cumprod)


def test_a_given_alphas_cumprod_is_kept(schedule):
    buffer = schedule.alphas_cumprod.float()  # what CompVis stores in the checkpoint
    loaded = DiffusionSchedule(buffer)
    assert torch.equal(loaded.alphas_cumprod, buffer.double())
    assert torch.allclose(loaded.betas, schedule.betas, rtol=1e-4)


@pytest.mark.parametrize(
    "bad", [torch.linspace(0.9, 0.1, 1), torch.linspace(0.1, 0.9, 10), torch.linspace(1.0, 0.1, 10)]
)
def test_rejects_a_bad_alphas_cumprod(bad):
    with pytest.raises(ValueError):
        DiffusionSchedule(bad)


def test_rejects_an_unknown_beta_schedule():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic", 1000, 0.00085, 0.012)


# CompVis make_ddim_timesteps("uniform", K, 1000): range(0, 1000, 1000 // K) + 1, ascending.
DDIM_10 = [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
DDIM_25 = [1, 41, 81, 121, 161, 201, 241, 281, 321, 361, 401, 441, 481, 521, 561, 601, 641, 681, 721, 761, 801,
           841, 881, 921, 961]
DDIM_50 = [1, 21, 41, 61, 81, 101, 121, 141, 161, 181, 201, 221, 241, 261, 281, 301, 321, 341, 361, 381, 401, 421,
           441, 461, 481, 501, 521, 541, 561, 581, 601, 621, 641, 661, 681, 701, 721, 741, 761, 781, 801, 821, 841,
           861, 881, 901, 921, 941, 961, 981]


@pytest.mark.parametrize("steps, expected", [(10, DDIM_10), (25, DDIM_25), (50, DDIM_50)])
def test_ddim_timesteps_equal_compvis_and_diffusers(schedule, steps, expected):
    assert schedule.ddim_timesteps(steps) == expected
    ref = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False)
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == expected[::-1]


def test_ddim_timesteps_follow_compvis_when_steps_do_not_divide_1000(schedule):
    # 1000 // 6 = 166: CompVis walks 7 timesteps for 6 steps (diffusers would walk 6).
    assert schedule.ddim_timesteps(6) == [1, 167, 333, 499, 665, 831, 997]
    assert len(schedule.ddim_timesteps(30)) == 31  # 1000 // 30 = 33: 1, 34, ..., 991


def test_ddim_timesteps_never_reach_past_the_schedule(schedule):
    # CompVis' range(0, 1000, 333) + 1 ends at 1000, an index past alphas_cumprod: dropped.
    assert schedule.ddim_timesteps(3) == [1, 334, 667]
    assert schedule.ddim_timesteps(9)[-1] == 889
    for steps in range(1, 1001):
        timesteps = schedule.ddim_timesteps(steps)
        # Only timestep 1000 can be dropped, so at most one step is lost (1000 steps walk 999).
        assert len(timesteps) >= steps - 1 and max(timesteps) < 1000


def test_ddim_levels_end_at_alphas_cumprod_0(schedule):
    # CompVis alphas_prev[0] = alphas_cumprod[0]: after timestep 1 DDIM steps to timestep 0.
    assert schedule.ddim_levels(10) == DDIM_10[::-1] + [0]


@pytest.mark.parametrize("steps", [0, 1001])
def test_ddim_timesteps_reject_bad_step_counts(schedule, steps):
    with pytest.raises(ValueError):
        schedule.ddim_timesteps(steps)


def test_get_sigmas_match_diffusers_linspace_on_integer_timesteps(schedule):
    # linspace(999, 0, 10) hits integer timesteps, where linear and log-sigma interpolation agree.
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(10)
    sigmas = schedule.get_sigmas(10)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    # diffusers' float32 betas leave 1.3e-5 relative at sigma(0) = sqrt(1 - a_0) / ..., where 1 - a_0 cancels.
    np.testing.assert_allclose(sigmas.numpy(), ref.sigmas.double().numpy(), rtol=3e-5)
    assert sigmas[0].item() == pytest.approx(schedule.sigmas[-1].item())
    assert sigmas[-2].item() == pytest.approx(schedule.sigmas[0].item())


def test_sigma_to_t_is_log_sigma_interpolation_and_inverts_t_to_sigma(schedule):
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    sigma = schedule.t_to_sigma(t)
    low, high = schedule.log_sigmas[t.floor().long()], schedule.log_sigmas[t.ceil().long()]
    expected = ((1 - t.frac()) * low + t.frac() * high).exp()
    assert torch.allclose(sigma, expected, rtol=1e-12)
    assert torch.allclose(schedule.sigma_to_t(sigma), t, atol=1e-9)
    # diffusers' _sigma_to_t is the same log-sigma interpolation.
    ref = EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(((1 - ref.alphas_cumprod.numpy()) / ref.alphas_cumprod.numpy()) ** 0.5)
    for s, tt in zip(sigma.tolist(), t.tolist()):
        assert float(ref._sigma_to_t(np.array(s), log_sigmas)) == pytest.approx(tt, abs=2e-3)
    # Out of range sigmas clamp to the ends.
    assert schedule.sigma_to_t(1e-6).item() == 0.0
    assert schedule.sigma_to_t(1e3).item() == 999.0


def test_get_sigmas_uses_fractional_timesteps(schedule):
    sigmas = schedule.get_sigmas(25)
    t = torch.linspace(999, 0, 25, dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(sigmas[:-1]), t, atol=1e-9)
    assert bool((sigmas[:-1].diff() < 0).all())
