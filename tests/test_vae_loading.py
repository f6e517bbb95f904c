"""--vae in every layout users find a VAE in gives the same model as a checkpoint that carries that VAE."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.layout import VAE_PREFIX
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from ldm.checkpoints.vae_files import read_vae_weights
from tests import checkpoint_variants as variants
from tests.reference import diffusers_vae
from tests.test_checkpoint_variants import assert_same_model


@pytest.fixture(scope="module")
def other_vae(tiny_config):
    """A second VAE (other random weights), CompVis keys without prefix."""
    return variants.vae_only(random_state_dict(tiny_config, seed=77))


@pytest.fixture(scope="module")
def carrying(tiny_state_dict, other_vae, tiny_config_path, tmp_path_factory):
    """The reference: one checkpoint file that carries the other VAE."""
    path = save_checkpoint(variants.with_vae(tiny_state_dict, other_vae), tmp_path_factory.mktemp("vae") / "carrying.safetensors")
    return load_stable_diffusion(path, tiny_config_path)


def _torch_save(obj, path):
    torch.save(obj, path)
    return path


def _diffusers_vae_model(other_vae, tiny_config_path):
    return diffusers_vae({VAE_PREFIX + k: v for k, v in other_vae.items()}, tiny_config_path)


LAYOUTS = {
    "bare safetensors": lambda vae, tmp, cfg: save_checkpoint(vae, tmp / "vae.safetensors"),
    "first_stage_model. ckpt": lambda vae, tmp, cfg: save_checkpoint(
        {VAE_PREFIX + k: v for k, v in vae.items()}, tmp / "vae.ckpt"),
    # vae-ft-mse-840000-ema-pruned.ckpt: {"state_dict": bare keys + the training loss's}, as a .pt too.
    "with training loss .pt": lambda vae, tmp, cfg: _torch_save(
        {"state_dict": {**vae, **variants.vae_training_loss()}, "global_step": 840000}, tmp / "vae.pt"),
    "diffusers folder": lambda vae, tmp, cfg: _save_pretrained(_diffusers_vae_model(vae, cfg), tmp / "vae_folder"),
    "diffusers single file": lambda vae, tmp, cfg: _save_pretrained(
        _diffusers_vae_model(vae, cfg), tmp / "vae_folder") / "diffusion_pytorch_model.safetensors",
    "diffusers .bin folder": lambda vae, tmp, cfg: _save_pretrained(
        _diffusers_vae_model(vae, cfg), tmp / "vae_bin", safe_serialization=False),
}


def _save_pretrained(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vae_layout_equals_a_checkpoint_carrying_it(layout, tiny_checkpoint, tiny_config_path, other_vae, carrying, tmp_path):
    vae_path = LAYOUTS[layout](other_vae, tmp_path, tiny_config_path)
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=vae_path)
    assert sd.vae_path == vae_path
    assert_same_model(sd, carrying)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sd.vae.decode(z), carrying.vae.decode(z))


def test_vae_from_a_whole_checkpoint_or_pipeline_folder(tiny_state_dict, other_vae, tiny_config_path, tmp_path, carrying, tiny_checkpoint):
    whole = save_checkpoint(variants.with_vae(tiny_state_dict, other_vae), tmp_path / "other-model.safetensors")
    assert_same_model(load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=whole), carrying)
    from tests.test_diffusers_layout import save_pipeline

    folder = save_pipeline(variants.with_vae(tiny_state_dict, other_vae), tiny_config_path, tmp_path / "pipe")
    assert_same_model(load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=folder), carrying)


def test_vae_overrides_a_half_precision_checkpoint(tiny_state_dict, other_vae, tiny_config_path, tmp_path):
    """A fp16 checkpoint with an fp32 VAE file: the VAE keeps full precision in an fp32 run."""
    half = save_checkpoint(variants.cast(tiny_state_dict, torch.float16), tmp_path / "half.safetensors")
    sd = load_stable_diffusion(half, tiny_config_path, vae=save_checkpoint(other_vae, tmp_path / "vae.safetensors"))
    assert all(torch.equal(sd.vae.state_dict()[k], v) for k, v in other_vae.items())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s: variants.kohya_lora(), "a LoRA, not a VAE: --vae takes a VAE file or folder"),
        (variants.sdxl, "SDXL checkpoint, not a VAE"),
        (lambda s: variants.without(s, VAE_PREFIX), "an SD v1 checkpoint without VAE, not a VAE"),
    ],
)
def test_not_a_vae(tiny_state_dict, tmp_path, make, message):
    path = save_checkpoint(make(tiny_state_dict), tmp_path / "not-a-vae.safetensors")
    with pytest.raises(CheckpointError, match=message):
        read_vae_weights(path)


def test_vae_of_another_shape_names_the_keys(tiny_checkpoint, tiny_config_path, tmp_path, other_vae):
    broken = dict(other_vae)
    broken.pop("decoder.conv_out.bias")
    path = save_checkpoint(broken, tmp_path / "broken-vae.safetensors")
    with pytest.raises(CheckpointError, match=rf"{path}: missing 1 VAE keys \(decoder\.conv_out\.bias\)"):
        load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=path)
