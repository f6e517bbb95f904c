"""Each file a user may pass as --ckpt is recognised from its keys, and a refusal says what it is and what to do."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.kinds import CheckpointKind, classify_checkpoint, inspect_checkpoint
from ldm.checkpoints.layout import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.config import ModelConfig
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_txt2img
from tests import checkpoint_variants as variants


@pytest.fixture(scope="module")
def inpainting_config(tiny_config) -> ModelConfig:
    return dataclasses.replace(tiny_config, unet=dataclasses.replace(tiny_config.unet, in_channels=9))


@pytest.fixture(scope="module")
def inpainting_state(inpainting_config):
    return random_state_dict(inpainting_config, seed=9)


def _diffusers_unet_file(state, config_path):
    from tests.reference import diffusers_unet

    return diffusers_unet(state, config_path).state_dict()


KINDS = [
    ("sd1", lambda s: s, CheckpointKind.SD_V1),
    ("sd1 without vae", lambda s: variants.without(s, VAE_PREFIX), CheckpointKind.SD_V1),
    ("sd1 ema only", variants.ema_only, CheckpointKind.SD_V1),
    ("sd2", variants.sd2, CheckpointKind.SD_V2),
    ("sd2 by context width", variants.sd2_diffusers_like, CheckpointKind.SD_V2),
    ("sdxl", variants.sdxl, CheckpointKind.SDXL),
    ("vae", lambda s: {**variants.vae_only(s), **variants.vae_training_loss()}, CheckpointKind.VAE),
    ("prefixed vae", lambda s: variants.vae_only(s, VAE_PREFIX), CheckpointKind.VAE),
    ("kohya lora", lambda s: variants.kohya_lora(), CheckpointKind.LORA),
    ("peft lora", lambda s: variants.peft_lora(), CheckpointKind.LORA),
    ("text encoder alone", lambda s: {k: v for k, v in s.items() if k.startswith(TEXT_PREFIX)}, CheckpointKind.UNKNOWN),
]


@pytest.mark.parametrize("name, make, kind", KINDS, ids=[k[0] for k in KINDS])
def test_classify(tiny_state_dict, name, make, kind):
    assert classify_checkpoint(make(tiny_state_dict)) is kind


def test_classify_inpainting_and_contents(inpainting_state, tiny_state_dict):
    assert classify_checkpoint(inpainting_state) is CheckpointKind.SD_V1_INPAINTING
    assert classify_checkpoint(variants.ema_only(inpainting_state)) is CheckpointKind.SD_V1_INPAINTING
    contents = inspect_checkpoint(variants.ema_only(tiny_state_dict))
    assert (contents.ema_only, contents.has_vae, contents.has_text_encoder, contents.unet_in_channels) == (True, True, True, 4)
    assert contents.context_dim == 32


def test_classify_diffusers_unet_file(tiny_state_dict, tiny_config_path):
    state = _diffusers_unet_file(tiny_state_dict, tiny_config_path)
    assert classify_checkpoint(state) is CheckpointKind.DIFFUSERS_MODEL


REFUSALS = [
    ("sd2", variants.sd2, "SD 2.x checkpoint (OpenCLIP text encoder): not supported; this program runs SD v1.x models"),
    ("sd2 by context width", variants.sd2_diffusers_like, "SD 2.x checkpoint (OpenCLIP text encoder): not supported"),
    ("sdxl", variants.sdxl, "SDXL checkpoint: not supported; this program runs SD v1.x models"),
    ("vae", lambda s: {**variants.vae_only(s), **variants.vae_training_loss()},
     "a VAE: pass it with --vae, and an SD v1 checkpoint with --ckpt"),
    ("no vae", lambda s: variants.without(s, VAE_PREFIX), "no VAE in this file: pass one with --vae"),
    ("kohya lora", lambda s: variants.kohya_lora(), "a LoRA: pass it with --lora, and an SD v1 checkpoint with --ckpt"),
    ("peft lora", lambda s: variants.peft_lora(), "a LoRA: pass it with --lora"),
    ("no text encoder", lambda s: variants.without(s, TEXT_PREFIX),
     "no text encoder (cond_stage_model.transformer.*) in this file: not a complete SD v1 checkpoint"),
    ("unknown", lambda s: {"weight": torch.zeros(3)}, "not a Stable Diffusion v1 checkpoint"),
]


@pytest.mark.parametrize("name, make, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal_says_what_the_file_is(tiny_state_dict, tiny_config_path, tmp_path, monkeypatch, name, make, message):
    path = save_checkpoint(make(tiny_state_dict), tmp_path / "file.safetensors")
    # Decided from the keys, before any model is built.
    monkeypatch.setattr("ldm.loading.stable_diffusion.UNetModel", _must_not_build)
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path, tiny_config_path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def _must_not_build(*args, **kwargs):
    raise AssertionError("a model was built for a file that is refused")


def test_inpainting_file_with_the_plain_config(inpainting_state, tiny_config_path, tmp_path):
    path = save_checkpoint(inpainting_state, tmp_path / "inpaint.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path, tiny_config_path)
    assert str(error.value) == f"{path}: an inpainting checkpoint: use optimizedSD/optimized_inpaint.py"


def test_inpainting_file_with_the_inpainting_config_loads(inpainting_state, inpainting_config, tiny_state_dict, tmp_path):
    sd = load_stable_diffusion(save_checkpoint(inpainting_state, tmp_path / "inpaint.safetensors"), inpainting_config)
    assert torch.equal(sd.unet.input_blocks[0][0].weight, inpainting_state[UNET_PREFIX + "input_blocks.0.0.weight"])
    plain = save_checkpoint(tiny_state_dict, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="inpainting needs an inpainting checkpoint"):
        load_stable_diffusion(plain, inpainting_config)


def test_eight_channel_unet(tiny_config, tiny_state_dict, tmp_path):
    state = dict(tiny_state_dict)
    weight = state[UNET_PREFIX + "input_blocks.0.0.weight"]
    state[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(weight.shape[0], 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"UNet takes 8 input channels \(instruct-pix2pix's layout\)"):
        load_stable_diffusion(save_checkpoint(state, tmp_path / "ip2p.safetensors"), tiny_config)


def test_diffusers_unet_file_points_to_the_folder(tiny_state_dict, tiny_config_path, tmp_path):
    path = save_checkpoint(_diffusers_unet_file(tiny_state_dict, tiny_config_path), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="one model of a diffusers-format folder: pass the folder that holds model_index.json"):
        load_stable_diffusion(path, tiny_config_path)


def test_the_cli_answers_a_refusal_in_one_line(tiny_state_dict, tiny_config_path, tmp_path, capsys):
    path = save_checkpoint(variants.vae_only(tiny_state_dict), tmp_path / "vae-ft-mse.safetensors")
    argv = ["--ckpt", str(path), "--config", str(tiny_config_path), "--device", "cpu", "--outdir", str(tmp_path / "out"),
            "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--prompt", "x"]
    assert optimized_txt2img.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "a VAE: pass it with --vae" in lines[0], lines
