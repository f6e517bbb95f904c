"""Our CompVis <-> diffusers UNet name map against diffusers' own converter, on the tiny config and on SD v1's
shapes (meta tensors: names and identities only, no data)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.config import load_model_config
from ldm.loading.lora_layouts import diffusers_unet_blocks, diffusers_unet_name, lora_targets
from ldm.loading.random_weights import UNET_PREFIX
from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.models.unet import UNetModel
from tests.conftest import SD_V1_CONFIG, TINY_CONFIG
from tests.reference import original_config


def meta_models(config_path):
    cfg = load_model_config(config_path)
    with torch.device("meta"):
        return cfg, UNetModel(cfg.unet), CLIPTextEncoder(cfg.text)


def diffusers_config_and_state(config_path, unet):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original_config(config_path), state)
    return config, state, convert_ldm_unet_checkpoint(dict(state), config)


@pytest.mark.parametrize("config_path", [TINY_CONFIG, SD_V1_CONFIG], ids=["tiny", "sd-v1"])
def test_unet_names_agree_with_convert_ldm_unet_checkpoint(config_path):
    """Every CompVis UNet key maps to the diffusers key diffusers' converter puts the same tensor under."""
    cfg, unet, _ = meta_models(config_path)
    _, state, converted = diffusers_config_and_state(config_path, unet)
    blocks = diffusers_unet_blocks(cfg.unet)
    for key, tensor in state.items():
        name = diffusers_unet_name(key.removeprefix(UNET_PREFIX), blocks)
        assert name in converted and converted[name] is tensor, key
    assert len(converted) == len(state)


@pytest.mark.parametrize("config_path", [TINY_CONFIG, SD_V1_CONFIG], ids=["tiny", "sd-v1"])
def test_every_layer_kohya_would_name_is_a_target(config_path):
    """kohya names layers ``lora_unet_`` + the diffusers module path (dots to underscores): every Linear and
    Conv2d of diffusers' UNet2DConditionModel, and every Linear of the CLIP, has exactly our module behind it."""
    from diffusers import UNet2DConditionModel

    cfg, unet, text_encoder = meta_models(config_path)
    config, _, _ = diffusers_config_and_state(config_path, unet)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    targets = lora_targets(unet, text_encoder.transformer, cfg.unet)
    kohya = {
        "lora_unet_" + name.replace(".", "_"): module
        for name, module in reference.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }
    ours = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(kohya) == len(ours)
    for name, module in kohya.items():
        assert targets[name].module.weight.shape == module.weight.shape, name
    assert {id(targets[name].module) for name in kohya} == {id(m) for m in ours}  # one to one
    text_layers = [n.removeprefix("text_model.") for n, m in text_encoder.transformer.named_modules() if isinstance(m, nn.Linear)]
    for name in text_layers:
        flat = name.replace(".", "_")
        assert targets[f"lora_te_text_model_{flat}"] is targets[f"lora_te1_text_model_{flat}"]
        assert targets[f"text_encoder.text_model.{name}"].path.removeprefix("text_model.") == name
