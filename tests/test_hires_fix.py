"""The hires fix (ldm/passes/hires.py) against a test-side implementation of the webui v1.10's algorithm
(``modules/processing.py`` ``sample_hr_pass``, ``sd_samplers_common.setup_img2img_steps``,
``sd_samplers_kdiffusion.sample_img2img``) on the tiny random-weight model: k-diffusion's own samplers
(``sample_dpmpp_2m`` on ``get_sigmas_karras``, ``sample_euler_ancestral`` on ``get_sigmas``) around the same UNet
with classifier-free guidance, per-image CPU generators, F.interpolate for the latent upscalers. Tolerance: the
latents within 2e-3 (k-diffusion works in float32 on float32 sigmas, ours on float64 levels)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.config import load_model_config
from ldm.passes.hires import hires_pass, hires_target, upscale
from ldm.pipeline.batches import plan_batches
from ldm.pipeline.encode import encode_prompts
from ldm.pipeline.model import load_model
from ldm.pipeline.request import HiresOptions
from ldm.pipeline.sample import sample_batch
from ldm.samplers import sample, walk_levels
from ldm.samplers.noise import SeededNoise
from optimizedSD.arguments import parse_args
from tests.conftest import TINY_CONFIG
from tests.test_dpm2_webui_grid import SHAPE, InnerModel, eps_model, k_diffusion, schedule  # noqa: F401 (fixtures)

SIZE = 128  # px: the tiny model's 16x16 latents; x1.5 gives 192 px, a multiple of 64


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoint):
    request = parse_args(["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
                          "--H", str(SIZE), "--W", str(SIZE), "--n_samples", "2", "--seed", "11", "--scale", "5",
                          "--prompt", "a castle", "--negative_prompt", "fog", "--no-watermark"], "txt2img")
    config = load_model_config(TINY_CONFIG)
    model = load_model(request, config, [], SIZE, SIZE)
    return request, model, config


class CfgModel(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser wraps: our UNet with guidance written out (the webui's CFGDenoiser
    mixes the denoised outputs, which is the same linear mix of the eps)."""

    def __init__(self, unet, alphas_cumprod, cond, uncond, scale):
        super().__init__()
        self.unet, self.cond, self.uncond, self.scale = unet, cond, uncond, scale
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32))

    def apply_model(self, x, t, cond=None):
        both = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def webui_hires(kd, model, request, cond, uncond, options, kind):
    """The webui's first pass and hires pass, written from its source over k-diffusion."""
    denoiser = kd.external.CompVisDenoiser(CfgModel(model.sd.unet, model.schedule.alphas_cumprod, cond, uncond,
                                                    request.scale))
    smin, smax = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    seeds = [request.seed + k for k in range(request.n_samples)]

    def sigmas(n):
        return kd.sampling.get_sigmas_karras(n, smin, smax) if kind == "karras" else denoiser.get_sigmas(n)

    def run(x, sched, generators):
        def noise_sampler(sigma, sigma_next):  # ancestral noise: each image's generator continues
            return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        if kind == "karras":
            return kd.sampling.sample_dpmpp_2m(denoiser, x, sched, disable=True)
        return kd.sampling.sample_euler_ancestral(denoiser, x, sched, disable=True, noise_sampler=noise_sampler)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn((4, SIZE // 8, SIZE // 8), generator=g) for g in generators])
    first = sigmas(request.steps)
    samples = run(x * first[0], first, generators)
    target = hires_target(SIZE, SIZE, options)
    mode, antialias = {"latent": ("bilinear", False), "latent-bicubic-antialiased": ("bicubic", True)}[options.upscaler]
    samples = F.interpolate(samples, size=(target.height // 8, target.width // 8), mode=mode, antialias=antialias)
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # the hires pass's new ImageRNG
    noise = torch.stack([torch.randn(samples.shape[1:], generator=g) for g in generators])
    steps, t_enc = int(options.steps / min(options.strength, 0.999)), options.steps - 1  # setup_img2img_steps
    sched = sigmas(steps)[steps - t_enc - 1:]
    return samples, run(samples + noise * sched[0], sched, generators)


@pytest.mark.parametrize("sampler, kind, upscaler", [
    ("dpmpp_2m", "karras", "latent"),
    ("euler_a", "uniform", "latent-bicubic-antialiased"),
])
def test_hires_pass_equals_the_webuis_algorithm(k_diffusion, tiny_run, sampler, kind, upscaler):
    base, model, config = tiny_run
    options = HiresOptions(scale=1.5, steps=4, strength=0.55, upscaler=upscaler)
    request = replace(base, sampler=sampler, steps=5, hires=options)
    encoder = encode_prompts(request, [request.prompt], model)
    batch = next(plan_batches(request, [request.prompt]))
    first = sample_batch(request, model, encoder, None, batch, (4, SIZE // 8, SIZE // 8))
    ours = hires_pass(request, model, encoder, batch, first)
    assert ours.shape == (2, 4, 24, 24)
    length = encoder.context_length(request.prompt, request.negative_prompt)
    cond = encoder.batch(request.prompt, 2, torch.device("cpu"), torch.float32, length)
    uncond = encoder.batch(request.negative_prompt, 2, torch.device("cpu"), torch.float32, length)
    with torch.no_grad():
        upscaled, expected = webui_hires(k_diffusion, model, request, cond, uncond, options, kind)
    torch.testing.assert_close(F.interpolate(first, size=(24, 24), mode="bilinear") if upscaler == "latent"
                               else upscaled, upscaled, atol=2e-3, rtol=0)
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=0)
    assert (ours - first.mean()).abs().mean() > 0.05  # the pass did something


def test_hires_walk_runs_exactly_the_asked_steps(tiny_run):
    schedule = tiny_run[1].schedule
    for steps, strength in ((4, 0.55), (20, 0.7), (7, 1.0), (3, 0.1)):
        longer = int(steps / min(strength, 0.999))
        levels = walk_levels("dpmpp_2m", schedule, steps, strength, "automatic", "hires")
        assert len(levels) == steps + 1
        assert levels == walk_levels("dpmpp_2m", schedule, longer)[longer - (steps - 1) - 1:]


@pytest.mark.parametrize("size, options, expected", [
    ((512, 512), HiresOptions(scale=2.0), (1024, 1024, 0, 0)),
    ((512, 768), HiresOptions(scale=1.5), (768, 1152, 0, 0)),
    ((512, 768), HiresOptions(resize=(1024, 0)), (1024, 1536, 0, 0)),
    ((512, 768), HiresOptions(resize=(0, 1024)), (682, 1024, 0, 0)),
    ((512, 768), HiresOptions(resize=(1024, 1024)), (1024, 1536, 0, 64)),  # covers 1024x1024, cropped
    ((768, 512), HiresOptions(resize=(1024, 1024)), (1536, 1024, 64, 0)),
])
def test_targets_as_the_webuis_calculate_target_resolution(size, options, expected):
    target = hires_target(*size, options)
    assert (target.upscale_width, target.upscale_height, target.truncate_x, target.truncate_y) == expected


@pytest.mark.parametrize("upscaler, resample", [("lanczos", Image.LANCZOS), ("nearest", Image.NEAREST)])
def test_pixel_upscalers_decode_resize_in_8_bits_and_encode_the_mean(tiny_run, upscaler, resample):
    """The webui's pixel path written out: decode, ``(255 * clamp((x + 1) / 2)).astype(uint8)``, Pillow's resize
    to int(W * scale), encode, here the posterior's mean times the scale factor."""
    base, model, _ = tiny_run
    request = replace(base, hires=HiresOptions(scale=1.5, upscaler=upscaler))
    latents = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(2))
    ours = upscale(request, model, latents)
    sd = model.sd
    expected = []
    with torch.no_grad():
        for latent in latents:
            decoded = sd.vae.decode(latent[None] / sd.scale_factor)[0]
            array = (255.0 * torch.clamp((decoded + 1) / 2, 0, 1).permute(1, 2, 0).numpy()).astype(np.uint8)
            resized = np.asarray(Image.fromarray(array).resize((192, 192), resample=resample), np.float32) / 255
            pixels = torch.from_numpy(resized).permute(2, 0, 1)[None] * 2 - 1
            expected.append(sd.scale_factor * sd.vae.encode(pixels).mean)
    assert ours.shape == (2, 4, 24, 24)
    torch.testing.assert_close(ours, torch.cat(expected), atol=1e-4, rtol=0)


def test_sde_hires_pass_spans_its_brownian_tree_over_the_longer_schedule(k_diffusion, schedule, eps_model):
    """The webui's hires pass builds its SDE noise sampler from ``get_sigmas(steps')``, the longer walk whose tail
    it runs (``sample_img2img``): for DPM++ 3M SDE its smallest positive sigma depends on that length."""
    name, seeds, steps, strength = "dpmpp_3m_sde", [5, 6], 4, 0.5
    noise = SeededNoise(seeds)
    x_T = noise.initial(SHAPE)
    init = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(9))
    got = sample(name, eps_model, schedule, x_T, steps, init_latent=init, strength=strength, noise_sampler=noise,
                 img2img_steps="hires")
    whole = torch.tensor(walk_levels(name, schedule, 8), dtype=torch.float32)  # int(4 / 0.5)
    tail = torch.tensor(walk_levels(name, schedule, steps, strength, img2img_steps="hires"), dtype=torch.float32)
    assert len(tail) == steps + 1
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    x = init + x_T * tail[0]
    tree = k_diffusion.sampling.BrownianTreeNoiseSampler(x, whole[whole > 0].min(), whole.max(), seed=seeds)
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_dpmpp_3m_sde(denoiser, x, tail, disable=True, noise_sampler=tree)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))
