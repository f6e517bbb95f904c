"""UniPC (``unipc``) against diffusers' ``UniPCMultistepScheduler`` with the webui's settings: ``solver_type="bh1"``,
``solver_order=3``, ``predict_x0=True``, ``lower_order_final=True``, SD v1's betas, ``timestep_spacing="linspace"``
(``round(linspace(999, 0, N + 1))``) and ``final_sigmas_type="sigma_min"`` (the last step ends at
``alphas_cumprod[0]``, not at 0).

How the grid corresponds to the webui's: the webui's UniPC (``sd_samplers_timesteps_impl.unipc``) runs
``N = len(range(0, 1000, 1000 // steps))`` steps (``steps`` where it divides 1000) over ``linspace(1, 1 / 1000,
N + 1)`` in continuous time, model timesteps ``linspace(999, 0, N + 1)``, fractional, ``alpha_t`` interpolated in
log between integer timesteps; our ``TIME_UNIFORM`` grid is those levels. diffusers rounds them to integers, so
``sample("unipc")`` equals diffusers exactly where they are integers (26 steps: N = 27, stride 37), and the
solver itself equals diffusers on diffusers' rounded grid for any N. What differs from the webui: it computes the
continuous times in float32 (timesteps off by ~1e-4); it refuses walks shorter than its order (N < 3), where we
lower the order as diffusers does; its img2img starts one DDIM stride below the level it noised the image at
(its own comment: "likely off by a bit") on a new time-uniform grid, ours walks the tail of the full grid from
the level the image is noised at.
"""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from ldm.samplers import walk_levels, sample
from ldm.samplers.common import ScheduledEps
from ldm.samplers.unipc import sample_unipc
from tests.test_samplers import SD, assert_close, cond, drive, eps_model, noise, one_thread, schedule, unet  # noqa: F401


def webui_unipc():
    return UniPCMultistepScheduler(**SD, solver_type="bh1", solver_order=3, predict_x0=True, lower_order_final=True,
                                   timestep_spacing="linspace", final_sigmas_type="sigma_min")


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_unipc_equals_diffusers_on_its_grid(eps_model, schedule, noise, n):
    ref = webui_unipc()
    ref.set_timesteps(n)
    levels = [*ref.timesteps.tolist(), 0]
    ours = sample_unipc(ScheduledEps(eps_model, schedule), noise, levels)
    expected = drive(ref, eps_model, noise)
    print(f"N={n}: max abs difference {(ours - expected).abs().max().item():.3g}")
    assert_close(ours, expected, tol=2e-4)


def test_unipc_walks_the_webuis_time_uniform_grid_and_equals_diffusers_where_it_is_integer(eps_model, schedule, noise):
    assert walk_levels("unipc", schedule, 20) == pytest.approx([999 - k * 999 / 20 for k in range(21)], abs=1e-9)
    assert walk_levels("unipc", schedule, 2) == [999, 499.5, 0]
    assert len(walk_levels("unipc", schedule, 6)) == 8  # range(0, 1000, 166): 7 steps, as the webui
    assert walk_levels("unipc", schedule, 26) == [999 - 37 * k for k in range(28)]
    ref = webui_unipc()
    ref.set_timesteps(27)
    expected = drive(ref, eps_model, noise)
    ours = sample("unipc", eps_model, schedule, noise, 26)
    print(f"26 steps: max abs difference {(ours - expected).abs().max().item():.3g}")
    assert_close(ours, expected, tol=2e-4)


def test_unipc_calls_the_model_once_a_step_and_img2img_walks_the_tail(eps_model, schedule, noise):
    calls, seen = [], []
    counting = lambda x, t: calls.append(float(t[0])) or eps_model(x, t)  # noqa: E731
    sample("unipc", counting, schedule, noise, 5, callback=lambda step, total, x: seen.append((step, total)))
    assert calls == pytest.approx([999, 799.2, 599.4, 399.6, 199.8, 0][:5], abs=1e-4)  # none after the last
    assert seen == [(i, 5) for i in range(5)]
    init = torch.randn_like(noise)
    levels = walk_levels("unipc", schedule, 10, strength=0.5)
    assert levels == pytest.approx([499.5, 399.6, 299.7, 199.8, 99.9, 0], abs=1e-9)
    a = schedule.alpha_bar(levels[0])
    assert schedule.alpha_bar(499) > a > schedule.alpha_bar(500)
    start = a**0.5 * init + (1 - a) ** 0.5 * noise
    expected = sample_unipc(ScheduledEps(eps_model, schedule), start, levels)
    assert_close(sample("unipc", eps_model, schedule, noise, 10, init_latent=init, strength=0.5), expected, tol=1e-6)
