"""Real-world variants of an SD v1 file load to the canonical file's model (or its dtype-rounded weights)."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.layout import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.config import load_model_config
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.loading.random_weights import save_checkpoint
from ldm.samplers.schedule import DiffusionSchedule
from tests import checkpoint_variants as variants


def _weights(sd) -> dict[str, torch.Tensor]:
    out = {"unet." + k: v for k, v in sd.unet.state_dict().items()}
    out.update({"vae." + k: v for k, v in sd.vae.state_dict().items()})
    out.update({"text." + k: v for k, v in sd.text_encoder.transformer.state_dict().items()})
    return out


def assert_same_model(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod)


@pytest.fixture(scope="module")
def canonical(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path)


def _load(state, tmp_path, config, name="variant.safetensors", **kwargs):
    return load_stable_diffusion(save_checkpoint(state, tmp_path / name), config, **kwargs)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_half_precision_files_load_with_the_configs_schedule(tiny_state_dict, tiny_config_path, tmp_path, caplog, file_dtype, suffix):
    # A converter's "fp16"/"bf16" option casts every tensor, alphas_cumprod too (bf16 rounds a_0 = 0.99915 to 1.0).
    state = variants.cast(tiny_state_dict, file_dtype)
    assert state["alphas_cumprod"][0] == 1.0 or file_dtype is torch.float16
    with caplog.at_level(logging.WARNING):
        sd = _load(state, tmp_path, tiny_config_path, name="half" + suffix)
    assert _warnings(caplog) == []  # rounding of the buffers is not a disagreement
    expected = DiffusionSchedule.from_config(load_model_config(tiny_config_path).schedule).alphas_cumprod
    assert torch.equal(sd.alphas_cumprod, expected) and sd.alphas_cumprod.dtype == torch.float64
    ours = sd.unet.state_dict()
    for key in (k for k in tiny_state_dict if k.startswith(UNET_PREFIX)):
        assert ours[key[len(UNET_PREFIX):]].dtype == torch.float32
        assert torch.equal(ours[key[len(UNET_PREFIX):]], tiny_state_dict[key].to(file_dtype).float())


@pytest.mark.parametrize("run_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_files_compute_in_the_precision_the_run_asks_for(tiny_state_dict, tiny_config_path, tmp_path, run_dtype):
    sd = _load(variants.cast(tiny_state_dict, torch.bfloat16), tmp_path, tiny_config_path, dtype=run_dtype)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert {p.dtype for p in module.parameters()} == {run_dtype}


def test_schedule_buffers_that_disagree_with_the_config_warn_once(tiny_state_dict, tiny_config_path, tmp_path, caplog, canonical):
    state = dict(tiny_state_dict)
    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.5
    with caplog.at_level(logging.WARNING):
        sd = _load(state, tmp_path, tiny_config_path)
    (warning,) = _warnings(caplog)
    assert "alphas_cumprod buffer differs from the schedule the config describes" in warning
    assert torch.equal(sd.alphas_cumprod, canonical.alphas_cumprod)


def test_schedule_is_the_float64_config_schedule(canonical, tiny_state_dict):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # diffusers: float32
    torch.testing.assert_close(canonical.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-6, atol=0)
    # The file's float32 buffer is the float64 schedule rounded once.
    assert torch.equal(canonical.alphas_cumprod.float(), tiny_state_dict["alphas_cumprod"])


def test_unused_keys_are_ignored_with_one_warning(tiny_state_dict, tiny_config_path, tmp_path, caplog, canonical):
    state = dict(tiny_state_dict)
    state[TEXT_PREFIX + "text_projection.weight"] = torch.eye(32)  # ComfyUI / kohya saves
    state[TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    state["something_else"] = torch.zeros(1)
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(2)  # training leftovers: silent
    state["logvar"] = torch.zeros(1000)
    with caplog.at_level(logging.WARNING):
        sd = _load(state, tmp_path, tiny_config_path)
    (warning,) = _warnings(caplog)
    assert "ignored 3 keys that belong to none of the three models" in warning
    assert_same_model(sd, canonical)


def test_model_keys_that_do_not_fit_stay_errors(tiny_state_dict, tiny_config_path, tmp_path):
    state = dict(tiny_state_dict)
    state[TEXT_PREFIX + "text_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected 1 text encoder keys \(.*extra\.weight\)"):
        _load(state, tmp_path, tiny_config_path)


@pytest.mark.parametrize("use_ema", [False, True])
def test_ema_only_file_is_used_and_says_so(tiny_state_dict, tiny_config_path, tmp_path, caplog, use_ema):
    with caplog.at_level(logging.WARNING):
        sd = _load(variants.ema_only(tiny_state_dict, shift=1.0), tmp_path, tiny_config_path, use_ema=use_ema)
    assert sd.used_ema
    (warning,) = _warnings(caplog)
    assert "holds only EMA weights for the UNet (model_ema.*): using them" in warning
    key = "input_blocks.0.0.weight"
    assert torch.equal(sd.unet.state_dict()[key], tiny_state_dict[UNET_PREFIX + key] + 1.0)


def test_incomplete_ema_only_file_names_the_missing_weights(tiny_state_dict, tiny_config_path, tmp_path):
    state = variants.ema_only(tiny_state_dict)
    state.pop("model_ema.diffusion_modelout2weight")
    with pytest.raises(CheckpointError, match=r"EMA weights incomplete \(no EMA copy of out\.2\.weight\)"):
        _load(state, tmp_path, tiny_config_path)


def test_file_without_vae_loads_with_vae(tiny_state_dict, tiny_config_path, tmp_path, canonical):
    vae = save_checkpoint(variants.vae_only(tiny_state_dict), tmp_path / "vae.safetensors")
    sd = _load(variants.without(tiny_state_dict, VAE_PREFIX), tmp_path, tiny_config_path, vae=vae)
    assert sd.vae_path == vae
    assert_same_model(sd, canonical)
