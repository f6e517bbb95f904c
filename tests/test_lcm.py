"""``--sampler lcm`` against diffusers' ``LCMScheduler`` (``from_config`` of SD v1's scheduler, as the LCM-LoRA model
cards load it): the same timesteps for every step count, and the same image from a txt2img run whose noise between
steps comes from the image's generator, with and without guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import samplers
from ldm.samplers.schedule import DiffusionSchedule
from optimizedSD import optimized_txt2img
from tests.conftest import SD_V1_CONFIG


def _lcm_scheduler(config):
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(config)


def test_lcm_timesteps_equal_diffusers_for_every_step_count():
    from diffusers import PNDMScheduler

    from ldm.config import load_model_config

    sd_v1 = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1)
    scheduler = _lcm_scheduler(sd_v1.config)
    schedule = DiffusionSchedule.from_config(load_model_config(SD_V1_CONFIG).schedule)
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        levels = samplers.walk_levels("lcm", schedule, steps)
        assert levels == scheduler.timesteps.tolist() + [0], steps
    assert samplers.walk_levels("lcm", schedule, 4)[:-1] == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="1 to 50 steps"):
        samplers.walk_levels("lcm", schedule, 51)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_cli_lcm_matches_diffusers_lcm_pipeline(tmp_path, tiny_config_path, scale):
    from ldm.config import load_model_config
    from ldm.loading.random_weights import random_state_dict, save_checkpoint
    from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint

    state = random_state_dict(load_model_config(tiny_config_path), seed=2025)
    ckpt = save_checkpoint(state, tmp_path / "random.safetensors")
    seed, prompt, steps = 21, "a red bicycle", 4
    argv = ["--ckpt", str(ckpt), "--config", str(tiny_config_path), "--device", "cpu", "--precision", "full",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(seed),
            "--sampler", "lcm", "--ddim_steps", str(steps), "--scale", str(scale), "--prompt", prompt,
            "--no-watermark", "--skip_grid"]
    assert optimized_txt2img.main(argv) == 0
    (path,) = list((tmp_path / "out").rglob("seed_*.png"))
    with Image.open(path) as image:
        ours = np.asarray(image.convert("RGB")).astype(np.float64)
        assert "Sampler: LCM" in image.info["parameters"]

    pipe = diffusers_pipeline_from_checkpoint(state, tiny_config_path)
    pipe.scheduler = _lcm_scheduler(pipe.scheduler.config)
    with torch.no_grad():
        theirs = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=scale,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    theirs = np.round(theirs * 255).astype(np.float64)
    assert ours.std() > 1
    assert np.abs(ours - theirs).mean() <= 1.0, np.abs(ours - theirs).mean()
