"""diffusers-format folders: our diffusers -> CompVis key mapping inverts diffusers' own converters exactly,
and a folder written by diffusers' ``save_pretrained`` loads to the single file's model."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.layout import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.checkpoints.diffusers_folders import (
    compvis_text_from_transformers,
    compvis_unet_from_diffusers,
    compvis_vae_from_diffusers,
    read_diffusers_folder,
)
from ldm.loading.stable_diffusion import load_stable_diffusion
from tests import checkpoint_variants as variants
from tests.conftest import REPO, SD_V1_CONFIG
from tests.reference import diffusers_unet, diffusers_vae, original_config, transformers_text_encoder
from tests.test_checkpoint_variants import assert_same_model


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _converted(state, config_path):
    """diffusers' converters applied to a CompVis state dict (the oracle for our inverse)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    original = original_config(config_path)
    unet = convert_ldm_unet_checkpoint(state, create_unet_diffusers_config_from_ldm(original, state))
    vae = convert_ldm_vae_checkpoint(state, create_vae_diffusers_config_from_ldm(original, state))
    return unet, vae, convert_ldm_clip_checkpoint(state)


def _assert_inverse(state, config_path, equal):
    unet, vae, text = _converted(state, config_path)
    ours_unet, ours_vae = compvis_unet_from_diffusers(unet), compvis_vae_from_diffusers(vae)
    for ours, prefix in ((ours_unet, UNET_PREFIX), (ours_vae, VAE_PREFIX)):
        expected = _strip(state, prefix)
        assert ours.keys() == expected.keys(), sorted(set(ours) ^ set(expected))[:6]
        assert all(equal(ours[k], expected[k]) for k in expected)
    expected_text = {k: v for k, v in _strip(state, TEXT_PREFIX).items() if not k.endswith("position_ids")}
    ours_text = {k: v for k, v in compvis_text_from_transformers(text).items() if not k.endswith("position_ids")}
    assert ours_text.keys() == expected_text.keys()
    assert all(equal(ours_text[k], expected_text[k]) for k in expected_text)


def test_mapping_inverts_diffusers_converters_tiny(tiny_state_dict, tiny_config_path):
    _assert_inverse(tiny_state_dict, tiny_config_path, torch.equal)


def test_mapping_inverts_diffusers_converters_full_sd_v1_shapes():
    """Every key of a real SD v1 file (meta tensors: shapes only), through diffusers' converters and back."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.config import load_model_config
    from ldm.loading.random_weights import compvis_state_dict
    from ldm.conditioning.text_encoder import CLIPTextEncoder
    from ldm.models.unet import UNetModel

    cfg = load_model_config(SD_V1_CONFIG)
    with torch.device("meta"):
        state = compvis_state_dict(UNetModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextEncoder(cfg.text), cfg)
    assert len(state) > 1100
    _assert_inverse(state, SD_V1_CONFIG, lambda a, b: a.shape == b.shape)


def test_old_diffusers_vae_attention_names(tiny_state_dict, tiny_config_path):
    """diffusers < 0.14 saved the VAE's mid attention as query / key / value / proj_attn."""
    _, vae, _ = _converted(tiny_state_dict, tiny_config_path)
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    renamed = {}
    for key, value in vae.items():
        for new, old in old_names.items():
            key = key.replace("attentions.0." + new, "attentions.0." + old)
        renamed[key] = value
    assert compvis_vae_from_diffusers(renamed).keys() == _strip(tiny_state_dict, VAE_PREFIX).keys()


def save_pipeline(state, config_path, folder, **save_kwargs):
    """A StableDiffusionPipeline built from the converted weights, written by diffusers' save_pretrained."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ldm.config import load_model_config

    cfg = load_model_config(config_path)
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(state, config_path), text_encoder=transformers_text_encoder(state, cfg.text),
        unet=diffusers_unet(state, config_path),
        tokenizer=CLIPTokenizer.from_pretrained(str(REPO / "models" / "tokenizer"), model_max_length=77),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="module")
def canonical(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path)


@pytest.mark.parametrize("save_kwargs", [{}, {"safe_serialization": False}], ids=["safetensors", "bin"])
def test_save_pretrained_folder_loads_to_the_single_files_model(tiny_state_dict, tiny_config_path, tmp_path, canonical, save_kwargs):
    folder = save_pipeline(tiny_state_dict, tiny_config_path, tmp_path / "pipe", **save_kwargs)
    suffix = ".bin" if save_kwargs else ".safetensors"
    assert any(p.suffix == suffix for p in (folder / "unet").iterdir())
    assert_same_model(load_stable_diffusion(folder, tiny_config_path), canonical)


def test_fp16_variant_folder(tiny_state_dict, tiny_config_path, tmp_path):
    half = variants.cast(tiny_state_dict, torch.float16)
    folder = save_pipeline(half, tiny_config_path, tmp_path / "pipe16", variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    single = load_stable_diffusion(
        __import__("ldm.loading.random_weights", fromlist=["save_checkpoint"]).save_checkpoint(half, tmp_path / "half.safetensors"),
        tiny_config_path,
    )
    assert_same_model(load_stable_diffusion(folder, tiny_config_path), single)


def test_sharded_folder(tiny_state_dict, tiny_config_path, tmp_path, canonical):
    folder = save_pipeline(tiny_state_dict, tiny_config_path, tmp_path / "sharded", max_shard_size="100KB")
    assert list((folder / "unet").glob("*.index.json"))
    assert_same_model(load_stable_diffusion(folder, tiny_config_path), canonical)


def test_folder_refusals(tiny_state_dict, tiny_config_path, tmp_path):
    folder = save_pipeline(tiny_state_dict, tiny_config_path, tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())

    config = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config.read_text())
    config.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match="its scheduler predicts v_prediction"):
        read_diffusers_folder(folder)
    config.write_text(json.dumps(scheduler))

    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(CheckpointError, match="SDXL checkpoint"):
        load_stable_diffusion(folder, tiny_config_path)
    (folder / "model_index.json").write_text(json.dumps(index))

    for weights in (folder / "vae").glob("diffusion_pytorch_model*"):
        weights.rename(weights.with_name("elsewhere" + weights.suffix))
    with pytest.raises(CheckpointError, match="no weights file found"):
        load_stable_diffusion(folder, tiny_config_path)
    import shutil

    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="no VAE in this file: pass one with --vae"):
        load_stable_diffusion(folder, tiny_config_path)


def test_shard_outside_the_folder_is_refused(tiny_state_dict, tiny_config_path, tmp_path):
    folder = save_pipeline(tiny_state_dict, tiny_config_path, tmp_path / "sharded", max_shard_size="100KB")
    (index,) = (folder / "unet").glob("*.index.json")
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../../etc/passwd"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="is not a file name in the same folder"):
        load_stable_diffusion(folder, tiny_config_path)


def test_folder_without_model_index(tmp_path, tiny_config_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="a folder without model_index.json"):
        load_stable_diffusion(tmp_path, tiny_config_path)
