"""The full SD v1 config builds the real models: parameter counts, and a key layout that diffusers'
own converters accept key for key and shape for shape (checked on the meta device: no memory, no time)."""

from __future__ import annotations

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.config import load_model_config
from ldm.loading.random_weights import compvis_state_dict
from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.models.unet import UNetModel
from tests.conftest import SD_V1_CONFIG
from tests.reference import original_config


@pytest.fixture(scope="module")
def sd_v1():
    cfg = load_model_config(SD_V1_CONFIG)
    with torch.device("meta"):
        modules = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextEncoder(cfg.text)
    return cfg, modules


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts(sd_v1):
    _, (unet, vae, text) = sd_v1
    assert _count(unet) == 859_520_964
    assert _count(vae) == 83_653_863
    assert _count(text.transformer) == 123_060_480


def _assert_same_layout(converted: dict, model: torch.nn.Module):
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items() if k in expected or not k.endswith("position_ids")}
    assert set(got) == set(expected)
    assert got == expected


def test_key_layout_is_what_diffusers_converts(sd_v1):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as convert

    cfg, modules = sd_v1
    state = compvis_state_dict(*modules, cfg)
    assert state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["alphas_cumprod"].shape == (1000,)

    original = original_config(SD_V1_CONFIG)
    unet_cfg = convert.create_unet_diffusers_config_from_ldm(original, state)
    vae_cfg = convert.create_vae_diffusers_config_from_ldm(original, state)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), DiffusersVAE(**vae_cfg)
    _assert_same_layout(convert.convert_ldm_unet_checkpoint(state, unet_cfg), unet)
    _assert_same_layout(convert.convert_ldm_vae_checkpoint(state, vae_cfg), vae)
    text = {k.removeprefix("text_model."): v for k, v in convert.convert_ldm_clip_checkpoint(state).items()}
    ours = {k.removeprefix("text_model."): v for k, v in modules[2].transformer.state_dict().items()}
    assert {k: v.shape for k, v in text.items() if not k.endswith("position_ids")} == {k: v.shape for k, v in ours.items()}


@pytest.mark.slow
def test_full_size_checkpoint_loads_strictly_and_matches_diffusers(tmp_path):
    """Every key of a real SD v1 file (schedule buffers and position_ids included), written as .ckpt, loads
    strictly and gives diffusers' UNet output. About 2 minutes and 14 GB of RAM on a 2-core CPU."""
    from ldm.loading.stable_diffusion import load_stable_diffusion
    from ldm.loading.random_weights import random_state_dict, save_checkpoint
    from tests.reference import diffusers_unet, max_abs_diff

    cfg = load_model_config(SD_V1_CONFIG)
    state = random_state_dict(cfg, seed=7)
    path = save_checkpoint(state, tmp_path / "sd-v1-random.ckpt")
    sd = load_stable_diffusion(path, SD_V1_CONFIG)
    reference = diffusers_unet(state, SD_V1_CONFIG)
    del state
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert max_abs_diff(sd.unet(x, t, context), reference(x, t, encoder_hidden_states=context).sample) < 1e-4
