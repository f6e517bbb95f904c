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


# The LCM-LoRA training script's targets (diffusers examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py):
# attention, projections, feed-forward, and every ResNet's convolutions and time projection, the resamplers' convs.
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def test_lcm_lora_in_diffusers_peft_layout_matches_diffusers(tmp_path, tiny_config_path):
    """An LCM-LoRA as diffusers saves it (``save_lora_weights`` of PEFT layers: ``unet.*.lora_A/B.weight`` and the
    adapter config in the metadata) through ``--lora``, sampled with ``lcm`` at scale 1, against diffusers'
    ``load_lora_weights`` and ``LCMScheduler``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from ldm.config import load_model_config
    from ldm.loading.random_weights import random_state_dict, save_checkpoint
    from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint

    state = random_state_dict(load_model_config(tiny_config_path), seed=2026)
    ckpt = save_checkpoint(state, tmp_path / "random.safetensors")
    torch.manual_seed(0)
    trainer = diffusers_pipeline_from_checkpoint(state, tiny_config_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LCM_LORA_TARGETS, init_lora_weights=False)
    trainer.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lcm_lora", unet_lora_layers=get_peft_model_state_dict(trainer.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    lora_file = tmp_path / "lcm_lora" / "pytorch_lora_weights.safetensors"
    seed, prompt, steps = 4, "a cat", 4
    argv = ["--ckpt", str(ckpt), "--config", str(tiny_config_path), "--device", "cpu", "--precision", "full",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(seed),
            "--sampler", "lcm", "--ddim_steps", str(steps), "--scale", "1", "--prompt", prompt, "--no-watermark",
            "--skip_grid", "--lora", f"{lora_file}:1"]
    assert optimized_txt2img.main(argv) == 0
    (path,) = list((tmp_path / "out").rglob("seed_*.png"))
    with Image.open(path) as image:
        ours = np.asarray(image.convert("RGB")).astype(np.float64)

    pipe = diffusers_pipeline_from_checkpoint(state, tiny_config_path)
    pipe.load_lora_weights(tmp_path / "lcm_lora")
    pipe.scheduler = _lcm_scheduler(pipe.scheduler.config)
    with torch.no_grad():
        theirs = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        pipe.unload_lora_weights()
        plain = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    theirs, plain = (np.round(image * 255).astype(np.float64) for image in (theirs, plain))
    assert np.abs(ours - theirs).mean() <= 1.0, np.abs(ours - theirs).mean()
    assert np.abs(theirs - plain).mean() > 2.0  # the LoRA moved the picture
