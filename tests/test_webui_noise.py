"""The webui's noise: CUDA's randn computed on the CPU (Philox), variation seeds, seed resize, ENSD, and the
DPM++ SDE samplers with their Brownian-tree noise against k-diffusion's own.

The oracle for the SDE samplers is k-diffusion (``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``,
``sample_dpmpp_3m_sde``) around the same eps model, given its ``BrownianTreeNoiseSampler`` seeded with the
images' seeds, as the webui's ``create_noise_sampler`` builds it; for ``--rng gpu`` torchsde's normal draws
come from Philox, as the webui's ``torchsde_randn``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchsde._brownian.brownian_interval as brownian_interval

from ldm.samplers import sample, walk_levels
from ldm.samplers.noise import SeededNoise, make_generator
from ldm.samplers.noise import PhiloxGenerator
from optimizedSD.infotext import read_parameters
from tests.test_cli_txt2img import pixels, run, samples
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
    """modules/rng.py's slerp written per column: for each channel c and column w, the H values of the two
    noises are two vectors at angle omega, blended sin((1 - val) omega) / sin(omega) and sin(val omega) / sin(omega);
    the webui blends linearly (with its swapped weights) when the mean cosine is above 0.9995."""
    cosine = torch.nn.functional.cosine_similarity(low, high, dim=1)  # (C, W)
    if cosine.mean() > 0.9995:
        return val * low + (1 - val) * high
    out = torch.empty_like(low)
    for c in range(low.shape[0]):
        for w in range(low.shape[2]):
            omega = torch.acos(cosine[c, w])
            a, b = torch.sin((1 - val) * omega) / torch.sin(omega), torch.sin(val * omega) / torch.sin(omega)
            out[c, :, w] = a * low[c, :, w] + b * high[c, :, w]
    return out


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
    sigmas = torch.tensor(walk_levels(name, schedule, steps), dtype=torch.float32)  # the automatic schedule
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


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_3m_sde"])
def test_sde_img2img_spans_the_brownian_tree_over_the_whole_schedule(k_diffusion, schedule, eps_model, name):
    """The webui's ``sample_img2img`` walks ``sigmas[steps - t_enc - 1:]`` but builds the noise sampler from the
    whole ``sigmas``: a tree over the walked tail alone reads another path."""
    seeds, steps, strength = [5, 6], 8, 0.5
    noise = SeededNoise(seeds)
    x_T = noise.initial(SHAPE)
    init = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(9))
    got = sample(name, eps_model, schedule, x_T, steps, init_latent=init, strength=strength, noise_sampler=noise,
                 img2img_steps="webui")
    whole = torch.tensor(walk_levels(name, schedule, steps), dtype=torch.float32)
    tail = torch.tensor(walk_levels(name, schedule, steps, strength, img2img_steps="webui"), dtype=torch.float32)
    assert len(tail) < len(whole)
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    x = init + x_T * tail[0]
    function, options = SDE[name]
    runs = {}
    for span, levels in (("whole", whole), ("tail", tail)):
        tree = k_diffusion.sampling.BrownianTreeNoiseSampler(x, levels[levels > 0].min(), levels.max(), seed=seeds)
        with torch.no_grad():
            runs[span] = getattr(k_diffusion.sampling, function)(denoiser, x, tail, disable=True,
                                                                 noise_sampler=tree, **options)
    scale = max(1.0, runs["whole"].abs().max().item())
    torch.testing.assert_close(got, runs["whole"], rtol=0, atol=2e-4 * scale)
    assert (got - runs["tail"]).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("name", list(SDE))
def test_sde_image_k_of_a_batch_equals_a_single_run_and_eta_0_draws_nothing(schedule, eps_model, name):
    x_T = SeededNoise([7, 8]).initial(SHAPE)

    def run(seeds, eta=1.0):
        return sample(name, eps_model, schedule, x_T[-len(seeds):], 6, ancestral_eta=eta, noise_sampler=SeededNoise(seeds))

    torch.testing.assert_close(run([7, 8])[1:], run([8]), rtol=0, atol=1e-6)
    assert not torch.allclose(run([8]), run([9]), atol=1e-3)  # the tree's seed is the image's
    torch.testing.assert_close(run([8], eta=0.0), run([9], eta=0.0), rtol=0, atol=0)


# Through the scripts: the flags, the metadata, the memory modes.


def test_cli_noise_flags_are_recorded_as_the_webui_writes_them(tiny_checkpoint, tmp_path):
    flags = ("--sampler", "dpmpp_2m_sde", "--n_samples", "2", "--seed", "5", "--rng", "gpu", "--subseed", "100",
             "--subseed_strength", "0.25", "--seed_resize_from", "128x64", "--eta", "0.5", "--ensd", "31337")
    assert run(tiny_checkpoint, tmp_path / "varied", *flags) == 0
    files = samples(tmp_path / "varied")
    assert [p.name for p in files] == ["seed_5_00000.png", "seed_5_00001.png"]  # a strength: one seed, subseeds count up
    text = read_parameters(files[1])
    for field in ("Variation seed: 101", "Variation seed strength: 0.25", "Seed resize from: 128x64", "Eta: 0.5",
                  "ENSD: 31337", "RNG: NV", "Sampler: DPM++ 2M SDE"):
        assert field in text
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))  # other variation seeds, other images
    assert run(tiny_checkpoint, tmp_path / "plain", "--sampler", "euler_a", "--n_samples", "1", "--seed", "5") == 0
    text = read_parameters(samples(tmp_path / "plain")[0])
    assert "RNG: CPU" in text and "Eta" not in text and "ENSD" not in text and "Variation" not in text
    assert run(tiny_checkpoint, tmp_path / "gpu", "--sampler", "euler_a", "--n_samples", "1", "--seed", "5",
               "--rng", "gpu") == 0
    assert not np.array_equal(pixels(samples(tmp_path / "plain")[0]), pixels(samples(tmp_path / "gpu")[0]))


@pytest.mark.parametrize("argv, message", [
    (("--sampler", "euler", "--eta", "0.5"), "--eta applies only"),
    (("--eta", "1.5", "--sampler", "euler_a"), "--eta must be between 0 and 1"),
    (("--subseed_strength", "2"), "--subseed_strength must be"),
    (("--seed_resize_from", "512"), "--seed_resize_from must be WIDTHxHEIGHT"),
    (("--ensd", "-1"), "--ensd must be"),
])
def test_cli_refuses_bad_noise_flags(tiny_checkpoint, tmp_path, capsys, argv, message):
    assert run(tiny_checkpoint, tmp_path, *argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SDE))
def test_sde_samplers_give_the_same_image_in_every_memory_mode(tiny_checkpoint, tmp_path, name):
    for mode in ("full", "medium", "low"):
        assert run(tiny_checkpoint, tmp_path / mode, "--sampler", name, "--vram", mode, "--n_samples", "2",
                   "--unet_bs", "1" if mode == "low" else "2") == 0
    reference = [pixels(path) for path in samples(tmp_path / "full")]
    for mode in ("medium", "low"):
        assert all(np.abs(pixels(path) - ref).max() <= 1 for path, ref in zip(samples(tmp_path / mode), reference))
