"""The webui's noise: CUDA's randn computed on the CPU (Philox), variation seeds, seed resize, ENSD, and the
DPM++ SDE samplers with their Brownian-tree noise against k-diffusion's own.

The oracle for the SDE samplers is k-diffusion (``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``,
``sample_dpmpp_3m_sde``) around the same eps model, given its ``BrownianTreeNoiseSampler`` seeded with the
images' seeds, as the webui's ``create_noise_sampler`` builds it; for ``--rng gpu`` torchsde's normal draws
come from Philox, as the webui's ``torchsde_randn``.
"""

from __future__ import annotations

import pytest
import torch
import torchsde._brownian.brownian_interval as brownian_interval

from ldm.samplers import SAMPLERS, sample
from ldm.samplers.noise import SeededNoise, make_generator
from ldm.samplers.philox import PhiloxGenerator
from tests.test_dpm2_webui_grid import InnerModel, eps_model, k_diffusion, schedule  # noqa: F401 (fixtures)

SHAPE = (4, 8, 8)
WEBUI_SEED_0 = [  # the webui's modules/rng_philox.py docstring: Generator(seed=0).randn(shape=(3, 4))
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


def test_philox_gives_the_published_cuda_values():
    generator = PhiloxGenerator(0)
    torch.testing.assert_close(generator.randn((3, 4)), torch.tensor(WEBUI_SEED_0), rtol=0, atol=2e-7)
    assert not torch.equal(generator.randn((3, 4)), torch.tensor(WEBUI_SEED_0))  # the offset moved on


def test_philox_is_fast_and_standard_normal_for_sd_latents():
    import time

    started = time.perf_counter()
    x = PhiloxGenerator(1234).randn((4, 64, 64))
    assert time.perf_counter() - started < 0.5
    assert abs(x.mean().item()) < 0.03 and abs(x.std().item() - 1) < 0.03
    assert torch.equal(x, PhiloxGenerator(1234).randn((4, 64, 64)))
    assert not torch.equal(x, PhiloxGenerator(1235).randn((4, 64, 64)))
    big = PhiloxGenerator(2**40 + 7).randn((2, 3))  # the seed's high word is the key's second word
    assert not torch.equal(big, PhiloxGenerator(7).randn((2, 3)))


def webui_slerp(val, low, high):
    """modules/rng.py's slerp, written out again: norms over dim 1."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


@pytest.mark.parametrize("rng", ["cpu", "gpu"])
def test_variation_seeds_are_the_webuis_slerp(rng):
    noise = SeededNoise([10, 10], rng, subseeds=[20, 21], subseed_strength=0.3)
    got = noise.initial(SHAPE)
    for k, subseed in enumerate((20, 21)):
        expected = webui_slerp(0.3, make_generator(rng, 10).randn(SHAPE), make_generator(rng, subseed).randn(SHAPE))
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6)
    # the image's generator drew once, whatever the blend: the next draw is its second
    second = make_generator(rng, 10)
    second.randn(SHAPE)
    torch.testing.assert_close(noise(got)[0], second.randn(SHAPE), rtol=0, atol=0)
    plain = SeededNoise([10], rng, subseeds=[20], subseed_strength=0).initial(SHAPE)
    torch.testing.assert_close(plain[0], make_generator(rng, 10).randn(SHAPE), rtol=0, atol=0)


def test_seed_resize_from_pastes_the_other_sizes_noise_centred():
    shape = (4, 8, 12)  # 96x64 px
    got = SeededNoise([3], seed_resize_from=(64, 64)).initial(shape)[0]  # drawn at 8x8 latents
    small = make_generator("cpu", 3).randn((4, 8, 8))
    own = make_generator("cpu", 3).randn(shape)
    torch.testing.assert_close(got[:, :, 2:10], small, rtol=0, atol=0)
    torch.testing.assert_close(got[:, :, :2], own[:, :, :2], rtol=0, atol=0)
    larger = SeededNoise([3], seed_resize_from=(64, 128)).initial((4, 8, 4))[0]  # 4x16 latents cropped to the centre
    torch.testing.assert_close(larger, make_generator("cpu", 3).randn((4, 16, 8))[:, 4:12, 2:6], rtol=0, atol=0)


def test_ensd_reseeds_every_draw_after_the_start_noise():
    noise = SeededNoise([5], "gpu", ensd=31337)
    start = noise.initial(SHAPE)
    torch.testing.assert_close(start[0], PhiloxGenerator(5).randn(SHAPE), rtol=0, atol=0)
    torch.testing.assert_close(noise(start)[0], PhiloxGenerator(5 + 31337).randn(SHAPE), rtol=0, atol=0)


SDE = {  # our name: (k-diffusion's function, its extra options)
    "dpmpp_sde": ("sample_dpmpp_sde", {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {"solver_type": "midpoint"}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}),
}


def _philox_randn(size, dtype, device, seed):
    return PhiloxGenerator(seed).randn(size).to(device=device, dtype=dtype)


@pytest.mark.parametrize("rng", ["cpu", "gpu"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("name", list(SDE))
def test_sde_samplers_equal_k_diffusion_with_the_webuis_brownian_tree(k_diffusion, schedule, eps_model, name, eta,
                                                                       rng, monkeypatch):
    seeds, steps = [5, 6], 8
    noise = SeededNoise(seeds, rng)
    x_T = noise.initial(SHAPE)
    got = sample(name, eps_model, schedule, x_T, steps, ancestral_eta=eta, noise_sampler=noise)
    sigmas = torch.tensor(SAMPLERS[name].grid.levels(schedule, steps), dtype=torch.float32)
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    if rng == "gpu":  # the webui's torchsde_randn: a fresh generator of the RNG mode
        monkeypatch.setattr(brownian_interval, "_randn", _philox_randn)
    x = x_T * sigmas[0]
    tree = k_diffusion.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    function, options = SDE[name]
    with torch.no_grad():
        expected = getattr(k_diffusion.sampling, function)(denoiser, x, sigmas, disable=True, eta=eta,
                                                           noise_sampler=tree, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("name", list(SDE))
def test_sde_image_k_of_a_batch_equals_a_single_run_and_eta_0_draws_nothing(schedule, eps_model, name):
    x_T = SeededNoise([7, 8]).initial(SHAPE)

    def run(seeds, eta=1.0):
        return sample(name, eps_model, schedule, x_T[-len(seeds):], 6, ancestral_eta=eta, noise_sampler=SeededNoise(seeds))

    torch.testing.assert_close(run([7, 8])[1:], run([8]), rtol=0, atol=1e-6)
    assert not torch.allclose(run([8]), run([9]), atol=1e-3)  # the tree's seed is the image's
    torch.testing.assert_close(run([8], eta=0.0), run([9], eta=0.0), rtol=0, atol=0)
