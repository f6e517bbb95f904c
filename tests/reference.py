"""The oracle: diffusers and transformers models built from the same CompVis-layout state dict,
through diffusers' own converters (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf


def original_config(config_path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)


def diffusers_unet(state: dict, config_path: Path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    cfg = create_unet_diffusers_config_from_ldm(original_config(config_path), state)
    model = UNet2DConditionModel(**cfg)
    model.load_state_dict(convert_ldm_unet_checkpoint(state, cfg), strict=True)
    return model.eval()


def diffusers_vae(state: dict, config_path: Path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    cfg = create_vae_diffusers_config_from_ldm(original_config(config_path), state)
    model = AutoencoderKL(**cfg)
    model.load_state_dict(convert_ldm_vae_checkpoint(state, cfg), strict=True)
    return model.eval()


def transformers_text_encoder(state: dict, text_config):
    """A ``transformers.CLIPTextModel`` loaded from the file's ``cond_stage_model.transformer.*`` keys
    by diffusers' converter (which strips the prefix itself)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    from ldm.conditioning.text_encoder import clip_text_config

    model = CLIPTextModel(clip_text_config(text_config))
    converted = convert_ldm_clip_checkpoint(state)
    expected = model.state_dict().keys()
    if not any(k.startswith("text_model.") for k in expected):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids") or k in expected}
    model.load_state_dict(converted, strict=True)
    return model.eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
