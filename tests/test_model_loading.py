"""Checkpoint layouts seen in the wild load strictly; broken ones are reported by key name."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.layout import ema_key as _ema_key
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.loading.random_weights import TEXT_PREFIX, UNET_PREFIX, save_checkpoint


def _save(state, tmp_path, name="variant.safetensors"):
    return save_checkpoint(state, tmp_path / name)


def _same_weights(module, state, prefix):
    ours = module.state_dict()
    return all(torch.equal(ours[k[len(prefix):]], v) for k, v in state.items() if k.startswith(prefix))


def test_loads_every_key_of_the_file(tiny_checkpoint, tiny_state_dict, tiny_config_path):
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path)
    assert _same_weights(sd.unet, tiny_state_dict, UNET_PREFIX)
    assert _same_weights(sd.vae, tiny_state_dict, "first_stage_model.")
    assert not sd.used_ema


@pytest.mark.parametrize("drop_text_model", [False, True])
@pytest.mark.parametrize("drop_position_ids", [False, True])
def test_text_key_variants(tiny_state_dict, tiny_config_path, tmp_path, drop_text_model, drop_position_ids):
    state = {}
    for key, value in tiny_state_dict.items():
        if drop_position_ids and key.endswith("position_ids"):
            continue
        if drop_text_model and key.startswith(TEXT_PREFIX):
            key = key.replace("text_model.", "", 1)
        state[key] = value
    sd = load_stable_diffusion(_save(state, tmp_path), tiny_config_path)
    reference = load_stable_diffusion(_save(tiny_state_dict, tmp_path, "plain.safetensors"), tiny_config_path)
    prompt = ["a red cube on a blue sphere"]
    assert torch.equal(sd.text_encoder.encode(prompt), reference.text_encoder.encode(prompt))


def test_ema_weights_used_when_present(tiny_state_dict, tiny_config_path, tmp_path):
    state = dict(tiny_state_dict)
    for key in [k for k in tiny_state_dict if k.startswith(UNET_PREFIX)]:
        state[_ema_key(key[len(UNET_PREFIX):])] = tiny_state_dict[key] + 1.0
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    path = _save(state, tmp_path)

    with_ema = load_stable_diffusion(path, tiny_config_path, use_ema=True)
    assert with_ema.used_ema
    weight = with_ema.unet.input_blocks[0][0].weight
    assert torch.equal(weight, tiny_state_dict[UNET_PREFIX + "input_blocks.0.0.weight"] + 1.0)

    without = load_stable_diffusion(path, tiny_config_path)  # the plain weights by default, as CompVis
    assert not without.used_ema
    assert torch.equal(without.unet.input_blocks[0][0].weight, tiny_state_dict[UNET_PREFIX + "input_blocks.0.0.weight"])


def test_incomplete_ema_is_an_error(tiny_state_dict, tiny_config_path, tmp_path):
    state = dict(tiny_state_dict)
    state[_ema_key("input_blocks.0.0.weight")] = tiny_state_dict[UNET_PREFIX + "input_blocks.0.0.weight"].clone()
    with pytest.raises(CheckpointError, match="EMA weights incomplete"):
        load_stable_diffusion(_save(state, tmp_path), tiny_config_path, use_ema=True)


def test_training_leftovers_are_ignored(tiny_state_dict, tiny_config_path, tmp_path):
    state = dict(tiny_state_dict)
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(2)
    state["logvar"] = torch.zeros(1000)
    load_stable_diffusion(_save(state, tmp_path), tiny_config_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(UNET_PREFIX + "out.2.weight"), r"missing 1 UNet keys \(out\.2\.weight\)"),
        (lambda s: s.pop("first_stage_model.decoder.conv_out.bias"), r"missing 1 VAE keys \(decoder\.conv_out\.bias\)"),
        (lambda s: s.__setitem__(UNET_PREFIX + "extra.weight", torch.zeros(1)), r"unexpected 1 UNet keys \(extra\.weight\)"),
        (
            lambda s: s.__setitem__(UNET_PREFIX + "out.2.bias", torch.zeros(5)),
            r"UNet shapes differ from the config \(out\.2\.bias \(5,\) vs \(4,\)\)",
        ),
        (
            lambda s: s.pop(TEXT_PREFIX + "text_model.final_layer_norm.weight"),
            r"missing 1 text encoder keys \(.*final_layer_norm\.weight\)",
        ),
    ],
)
def test_broken_checkpoints_name_the_keys(tiny_state_dict, tiny_config_path, tmp_path, edit, message):
    state = dict(tiny_state_dict)
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        load_stable_diffusion(_save(state, tmp_path), tiny_config_path)


def test_wrong_config_is_reported(tiny_checkpoint):
    # The tiny file against the full SD v1 config: every shape disagrees, and the message says so in one line.
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(tiny_checkpoint)
    assert "does --config match this checkpoint?" in str(error.value)
    assert "\n" not in str(error.value)


def test_file_that_is_not_sd(tmp_path, tiny_config_path):
    path = _save({"weight": torch.zeros(3)}, tmp_path)
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1 checkpoint"):
        load_stable_diffusion(path, tiny_config_path)
