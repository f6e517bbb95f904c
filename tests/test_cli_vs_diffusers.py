"""The CLI's image against diffusers' StableDiffusionPipeline on the same random checkpoint.

The pipeline is built offline from in-memory components converted from the checkpoint by diffusers' own
single-file converters, gets the same initial noise (``latents=``, CompVis-style CPU-seeded) and runs DDIM
with a step count that divides 1000 (where CompVis' and diffusers' timesteps agree). The CLI writes its PNG
with rounding, without watermark; the mean absolute difference must stay within one 8-bit level.

Self-contained on purpose (no conftest fixtures): the helper below is the oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from optimizedSD import optimized_txt2img

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"
TOKENIZER_DIR = REPO / "models" / "tokenizer"


def diffusers_pipeline_from_checkpoint(state: dict[str, torch.Tensor], config_path: Path):
    """StableDiffusionPipeline from a CompVis-layout state dict, converted with diffusers' converters (offline)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.config import load_model_config
    from ldm.conditioning.text_encoder import clip_text_config

    original = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    params = original["model"]["params"]

    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True)

    vae_config = create_vae_diffusers_config_from_ldm(original, state)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)

    text_encoder = CLIPTextModel(clip_text_config(load_model_config(config_path).text))
    converted = convert_ldm_clip_checkpoint(state)
    expected = text_encoder.state_dict().keys()
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5.6 has no text_model. prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k in expected or not k.endswith("position_ids")}
    text_encoder.load_state_dict(converted, strict=True)

    scheduler = DDIMScheduler(
        num_train_timesteps=params["timesteps"], beta_start=params["linear_start"], beta_end=params["linear_end"],
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16], ids=["fp32-file", "fp16-file"])
@pytest.mark.parametrize("steps, scale, negative", [(4, 7.5, ""), (5, 3.0, "a blurry photo")])
def test_cli_matches_diffusers_pipeline(tmp_path, steps, scale, negative, file_dtype):
    from ldm.config import load_model_config
    from ldm.samplers.noise import SeededNoise
    from ldm.loading.random_weights import random_state_dict, save_checkpoint

    state = random_state_dict(load_model_config(TINY_CONFIG), seed=2024)
    # An fp16 file (every tensor cast, the schedule buffers too): diffusers computes the schedule from its config.
    state = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in state.items()}
    ckpt = save_checkpoint(state, tmp_path / "random.ckpt")
    seed, prompt = 31, "a photograph of an astronaut riding a horse"

    argv = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--precision", "full",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(seed),
            "--sampler", "ddim", "--ddim_steps", str(steps), "--scale", str(scale), "--prompt", prompt,
            "--negative_prompt", negative, "--no-watermark", "--skip_grid"]
    assert optimized_txt2img.main(argv) == 0
    (path,) = list((tmp_path / "out").rglob("seed_*.png"))
    with Image.open(path) as image:
        ours = np.asarray(image.convert("RGB")).astype(np.float64)

    pipe = diffusers_pipeline_from_checkpoint({k: v.float() for k, v in state.items()}, TINY_CONFIG)
    latents = SeededNoise([seed]).initial((4, 8, 8))
    with torch.no_grad():
        theirs = pipe(prompt, negative_prompt=negative or None, height=64, width=64, num_inference_steps=steps,
                      guidance_scale=scale, eta=0.0, latents=latents, output_type="np").images[0]
    theirs = np.round(theirs * 255).astype(np.float64)

    assert ours.shape == theirs.shape == (64, 64, 3)
    assert ours.std() > 1  # a real picture, not a constant
    assert np.abs(ours - theirs).mean() <= 1.0, np.abs(ours - theirs).mean()
    # Same schedule, same weights: at most a stray rounding flip (a schedule read from the fp16 buffers moved 0.6%).
    assert (ours != theirs).mean() <= 0.002, (ours != theirs).mean()
