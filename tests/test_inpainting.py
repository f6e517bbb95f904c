"""ldm/pipeline/inpainting.py: the 9-channel config and checkpoints, the UNet wrapper, the per-step blend in every sampler."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ldm import samplers
from ldm.checkpoints.errors import CheckpointError
from ldm.config import load_model_config
from ldm.pipeline.inpainting import (
    InpaintingUNet,
    LatentBlend,
    blend_then,
    latent_mask,
    masked_image,
    sampler_blend,
)
from ldm.checkpoints.kinds import checkpoint_unet_in_channels, is_inpainting_checkpoint, unet_in_channels
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from ldm.samplers.schedule import DiffusionSchedule
from ldm.models.unet import UNetModel
from tests.conftest import REPO, SD_V1_CONFIG
from tests.test_inpainting_vs_diffusers import tiny_inpainting_config

INPAINTING_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"


def test_inpainting_config_is_v1_with_a_9_channel_unet():
    raw = OmegaConf.load(INPAINTING_CONFIG).model
    assert raw.target == "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    assert raw.params.conditioning_key == "hybrid"
    inpainting, plain = load_model_config(INPAINTING_CONFIG), load_model_config(SD_V1_CONFIG)
    assert (inpainting.unet.in_channels, inpainting.unet.out_channels) == (9, 4)
    assert inpainting.vae == plain.vae and inpainting.text == plain.text and inpainting.schedule == plain.schedule
    with torch.device("meta"):
        unet, reference = UNetModel(inpainting.unet), UNetModel(plain.unet)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert shapes.pop("input_blocks.0.0.weight") == (320, 9, 3, 3)
    assert reference_shapes.pop("input_blocks.0.0.weight") == (320, 4, 3, 3)
    assert shapes == reference_shapes  # only the first conv differs, as in sd-v1-5-inpainting.ckpt
    # 5 more input channels of the first 3x3 conv: 14,400 more weights than SD v1's UNet
    params = sum(math.prod(s) for s in shapes.values()) + 320 * 9 * 9
    assert params == 859_520_964 + 320 * 5 * 9


def test_9_channel_random_checkpoint_loads_and_is_detected(tmp_path, tiny_state_dict):
    config = tiny_inpainting_config(tmp_path)
    state = random_state_dict(load_model_config(config), seed=3)
    assert unet_in_channels(state) == 9 and is_inpainting_checkpoint(state)
    assert unet_in_channels(tiny_state_dict) == 4 and not is_inpainting_checkpoint(tiny_state_dict)
    assert unet_in_channels({}) is None
    ckpt = save_checkpoint(state, tmp_path / "inpainting.ckpt")
    assert checkpoint_unet_in_channels(ckpt) == 9
    assert checkpoint_unet_in_channels(save_checkpoint(tiny_state_dict, tmp_path / "plain.safetensors")) == 4
    sd = load_stable_diffusion(ckpt, config)
    assert sd.unet.input_blocks[0][0].weight.shape[1] == 9
    torch.testing.assert_close(sd.unet.input_blocks[0][0].weight, state["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(CheckpointError, match="inpainting checkpoint: use optimizedSD/optimized_inpaint.py"):
        load_stable_diffusion(ckpt, REPO / "configs" / "tiny-random.yaml")


def test_mask_at_latent_size_and_masked_image():
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., 8:16, 0:8] = 0.6  # binarized to 1
    mask[..., 0:8, 8:16] = 0.4  # binarized to 0
    small = latent_mask(mask)
    assert small.shape == (1, 1, 2, 3)
    assert small.flatten().tolist() == [0, 0, 0, 1, 0, 0]
    pixels = torch.rand(1, 3, 16, 24) * 2 - 1
    kept = masked_image(pixels, mask)
    assert torch.equal(kept[..., 8:16, 0:8], torch.zeros(1, 3, 8, 8))
    assert torch.equal(kept[..., 0:8, :], pixels[..., 0:8, :])
    with pytest.raises(ValueError, match="multiple of 8"):
        latent_mask(torch.ones(1, 1, 12, 16))


def test_inpainting_unet_concatenates_latent_mask_and_masked_latent():
    seen = []

    def unet(x, t, context):
        seen.append(x)
        return x[:, :4] * 0

    mask = torch.rand(2, 1, 4, 4).round()
    masked_latent = torch.randn(2, 4, 4, 4)
    wrapped = InpaintingUNet(unet, mask, masked_latent)
    x = torch.randn(4, 4, 4, 4)  # unconditional + conditional passes of a batch of 2, in one call
    assert wrapped(x, torch.zeros(4), torch.zeros(4, 77, 8)).shape == (4, 4, 4, 4)
    (seen_x,) = seen
    assert seen_x.shape == (4, 9, 4, 4)
    assert torch.equal(seen_x[:, :4], x)
    assert torch.equal(seen_x[:, 4:5], torch.cat([mask, mask]))
    assert torch.equal(seen_x[:, 5:], torch.cat([masked_latent, masked_latent]))
    one = InpaintingUNet(unet, mask[:1], masked_latent[:1])  # one mask and image for a batch of 3
    one(torch.randn(3, 4, 4, 4), torch.zeros(3), torch.zeros(3, 77, 8))
    assert torch.equal(seen[-1][:, 5:], masked_latent[:1].expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="multiple"):
        wrapped(torch.randn(3, 4, 4, 4), torch.zeros(3), torch.zeros(3, 77, 8))


def _toy_eps(x, t):
    """A smooth stand-in eps model: enough to move the latent, cheap enough for every sampler."""
    return 0.3 * torch.tanh(x) + 0.01 * (t[:, None, None, None] / 1000)


@pytest.mark.parametrize("name", [n for n in samplers.SAMPLER_NAMES if not samplers.SAMPLERS[n].adaptive])
@pytest.mark.parametrize("strength", [1.0, 0.55])
def test_every_sampler_keeps_the_known_region_at_the_init_latent_noised_to_each_step(name, strength):
    schedule = DiffusionSchedule.from_config(load_model_config(SD_V1_CONFIG).schedule)
    generator = torch.Generator().manual_seed(0)
    init_latent = torch.randn(2, 4, 6, 6, generator=generator)
    noise = torch.randn(2, 4, 6, 6, generator=generator)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 1:4, 2:5] = 1
    steps = 8
    blend = sampler_blend(name, schedule, steps, strength, init_latent, mask, noise)
    known = (mask == 0).expand_as(init_latent)
    seen = []

    def record(step, total, x):
        seen.append((step, total, x.clone()))

    eta = 0.5 if name == "ddim" else 0.0
    ancestral_noise = lambda like: torch.randn(like.shape, generator=generator)  # noqa: E731
    x = samplers.sample(name, _toy_eps, schedule, noise, steps, eta=eta, init_latent=init_latent, strength=strength,
                        noise_sampler=ancestral_noise, callback=blend_then(blend, record))
    total = seen[0][1]
    assert [s for s, _, _ in seen] == list(range(total)) == list(range(blend.steps))
    grid = samplers.SAMPLERS[name].grid
    for step, _, latent in seen[:-1]:  # each step's known region: the init latent noised to the step's level
        level = blend.levels[step + 1]
        assert level > 0
        assert torch.equal(latent[known], grid.noised(schedule, init_latent, noise, level)[known])
    assert torch.equal(x[known], init_latent[known])  # clean after the last step
    assert not torch.allclose(x[~known], init_latent[~known], atol=1e-2)  # the masked part was repainted


def test_blend_walks_the_samplers_grids():
    schedule = DiffusionSchedule.from_config(load_model_config(SD_V1_CONFIG).schedule)
    z = torch.ones(1, 4, 2, 2)
    ddim = sampler_blend("ddim", schedule, 10, 1.0, z, z[:, :1] * 0, z * 2)
    assert ddim.levels == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0] and ddim.steps == 10
    a = schedule.alpha_bar(801)
    torch.testing.assert_close(ddim.known(0), (math.sqrt(a) + 2 * math.sqrt(1 - a)) * z)
    assert torch.equal(ddim.known(9), z)  # clean, not noised to alphas_cumprod[0]
    euler = sampler_blend("euler", schedule, 10, 0.5, z, z[:, :1], z)
    assert euler.levels == schedule.get_sigmas(10).tolist()[-6:]
    assert sampler_blend("lms", schedule, 10, 0.05, z, z[:, :1], z) is None  # int(0.05 * 10) = 0 steps
    with pytest.raises(ValueError, match="built for 10 steps"):
        ddim(0, 7, z)
    with pytest.raises(ValueError, match="differ in shape"):
        LatentBlend(z, z[:, :1], torch.zeros(2, 4, 2, 2), schedule, samplers.SAMPLERS["ddim"].grid, [1, 0])

