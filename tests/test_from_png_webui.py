"""``--from_png`` reads an infotext as its writer meant it: the webui's noise fields, the webui's version
(pre-1.9 labels named no schedule), and img2img's step rule (the webui's ``t_enc = int(min(d, 0.999) * steps)``,
``t_enc + 1`` steps on ``sigmas[steps - t_enc - 1:]``; this tool's own images keep this tool's rule)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm.samplers import sample, walk_levels
from optimizedSD.arguments import parse_args
from tests.test_cli_webui import _png_with
from tests.test_dpm2_webui_grid import SHAPE, InnerModel, eps_model, k_diffusion, schedule  # noqa: F401 (fixtures)

WEBUI = "a cat\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 42, Size: 512x512{extra}"


def restored(tmp_path, text: str, mode: str = "txt2img", *argv: str):
    source = _png_with(tmp_path / "source.png", text)
    if mode == "img2img":
        Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
        argv = ("--init-img", str(tmp_path / "init.png"), *argv)
    return parse_args(["--from_png", str(source), *argv], mode)


@pytest.mark.parametrize("version, expected", [(", Version: v1.8.0", "uniform"), (", Version: v1.10.1", "automatic"),
                                               (", Version: f0.0.17v1.8.0rc-latest-276-g29be1da7", "uniform"),
                                               (", Schedule type: Karras, Version: v1.8.0", "karras"), ("", "automatic")])
def test_plain_dpmpp_2m_is_uniform_before_webui_1_9(tmp_path, version, expected):
    request = restored(tmp_path, WEBUI.format(sampler="DPM++ 2M", extra=version))
    assert (request.sampler, request.schedule) == ("dpmpp_2m", expected)


@pytest.mark.parametrize("extra, rng", [("", "gpu"), (", RNG: GPU", "gpu"), (", RNG: NV", "gpu"), (", RNG: CPU", "cpu")])
def test_rng_missing_means_the_webuis_gpu_noise(tmp_path, extra, rng):
    assert restored(tmp_path, WEBUI.format(sampler="Euler a", extra=extra + ", Version: v1.10.1")).rng == rng


def test_noise_fields_become_their_flags(tmp_path):
    text = WEBUI.format(sampler="Euler a", extra=", Eta: 0.67, ENSD: 31337, Variation seed: 7, "
                        "Variation seed strength: 0.3, Seed resize from: 768x512, RNG: CPU, Version: v1.10.1")
    request = restored(tmp_path, text)
    assert (request.eta_ancestral, request.ensd, request.subseed, request.subseed_strength) == (0.67, 31337, 7, 0.3)
    assert request.seed_resize_from == (768, 512) and request.rng == "cpu"


@pytest.mark.parametrize("version, rule", [(", Version: v1.10.1", "webui"), (", Version: optimizedSD 0.1.0", "cut"),
                                           ("", "cut")])
def test_img2img_replays_with_its_writers_step_rule(tmp_path, version, rule):
    text = WEBUI.format(sampler="Euler", extra=", Denoising strength: 0.75" + version)
    request = restored(tmp_path, text, "img2img")
    assert (request.strength, request.img2img_steps) == (0.75, rule)


def test_this_tools_images_say_which_rule_they_used(tmp_path):
    text = WEBUI.format(sampler="Euler", extra=", Denoising strength: 0.5, Img2img steps: webui, "
                        "Version: optimizedSD 0.1.0")
    assert restored(tmp_path, text, "img2img").img2img_steps == "webui"


@pytest.mark.parametrize("strength", [0.75, 0.5, 1.0, 0.05])
def test_webui_step_rule_walks_the_webuis_tail(schedule, strength):  # noqa: F811
    full = walk_levels("euler", schedule, 20)
    t_enc = int(min(strength, 0.999) * 20)
    assert walk_levels("euler", schedule, 20, strength, img2img_steps="webui") == full[20 - t_enc - 1:]
    assert len(walk_levels("euler", schedule, 20, strength)) - 1 == (20 if strength == 1 else int(strength * 20))


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_webui_img2img_equals_k_diffusion_run_as_the_webui_runs_it(k_diffusion, schedule, eps_model, strength):  # noqa: F811
    """The webui's ``sample_img2img``: ``xi = x + noise * sigma_sched[0]``, then the sampler on ``sigma_sched``."""
    steps = 10
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))[None]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))[None]
    got = sample("euler", eps_model, schedule, noise, steps, init_latent=init, strength=strength, img2img_steps="webui")
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    sigmas = denoiser.get_sigmas(steps)
    t_enc = int(min(strength, 0.999) * steps)
    sigma_sched = sigmas[steps - t_enc - 1:]
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_euler(denoiser, init + noise * sigma_sched[0], sigma_sched, disable=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))
