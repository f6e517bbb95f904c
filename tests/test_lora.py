"""LoRA files merged into our models equal diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same files.

Both sides start from the same tiny random checkpoint; the files are random, in the real key layouts
(``tests/lora_files.py``). Our merged UNet is converted to diffusers' layout by diffusers' own
``convert_ldm_unet_checkpoint`` and compared weight by weight; the text encoders are the same transformers
class on both sides.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ldm.lora import LoraError, apply_loras, load_lora
from ldm.lora_layouts import lora_targets
from ldm.model_loading import load_stable_diffusion
from ldm.random_checkpoint import UNET_PREFIX
from tests import lora_files
from tests.reference import max_abs_diff
from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint

TOLERANCE = 1e-4


@pytest.fixture
def ours(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path)


@pytest.fixture
def pipe(tiny_state_dict, tiny_config_path):
    return diffusers_pipeline_from_checkpoint(tiny_state_dict, tiny_config_path)


def diffusers_named(sd, unet_config):
    """Our models' weights under diffusers' UNet names (by diffusers' converter) and the CLIP's own names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_state = {UNET_PREFIX + k: v for k, v in sd.unet.state_dict().items()}
    return convert_ldm_unet_checkpoint(unet_state, unet_config), sd.text_encoder.transformer.state_dict()


def reference_fused(pipe, files_and_weights):
    """diffusers: each file loaded as an adapter, weighted by ``set_adapters``, fused, then unloaded."""
    names = [f"lora{i}" for i in range(len(files_and_weights))]
    for name, (path, _) in zip(names, files_and_weights):
        # unet_config: diffusers then maps CompVis-named (sgm) kohya keys, as for SDXL files.
        pipe.load_lora_weights(str(path), adapter_name=name, unet_config=pipe.unet.config)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in files_and_weights])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


def compare(sd, pipe, base_unet, base_text):
    """Worst |ours - diffusers| over UNet and text encoder, and how many weights each side changed."""
    unet, text = diffusers_named(sd, pipe.unet.config)
    ref_unet, ref_text = pipe.unet.state_dict(), pipe.text_encoder.state_dict()
    assert set(unet) == set(ref_unet) and set(text) == set(ref_text)
    worst = max(max_abs_diff(unet[k], ref_unet[k]) for k in ref_unet)
    worst = max(worst, max(max_abs_diff(text[k], ref_text[k]) for k in ref_text))
    changed_ours = sum(not torch.equal(unet[k], base_unet[k]) for k in unet) + sum(
        not torch.equal(text[k], base_text[k]) for k in text
    )
    changed_ref = sum(not torch.equal(ref_unet[k], base_unet[k]) for k in ref_unet) + sum(
        not torch.equal(ref_text[k], base_text[k]) for k in ref_text
    )
    return worst, changed_ours, changed_ref


def write_layout(layout, pipe, ours, tmp_path):
    unet_layers = lora_files.layers(pipe.unet)
    text_layers = lora_files.layers(pipe.text_encoder)
    if layout == "kohya":
        return lora_files.save(lora_files.kohya_lora(unet_layers, text_layers, 1), tmp_path / "kohya.safetensors")
    if layout == "kohya_te1_pt":
        tensors = lora_files.kohya_lora(unet_layers[::2], text_layers, 2, te_prefix="lora_te1_text_model_")
        return lora_files.save(tensors, tmp_path / "kohya_te1.pt")
    if layout == "kohya_compvis_names":
        tensors = lora_files.kohya_lora(lora_files.layers(ours.unet, 3), text_layers, 3)
        return lora_files.save(tensors, tmp_path / "kohya_sgm.safetensors")
    if layout == "peft":
        return lora_files.save(lora_files.peft_lora(unet_layers, text_layers, 4), tmp_path / "peft.safetensors")
    if layout == "peft_metadata":
        unet_layers, text_layers = unet_layers[::3], text_layers[::2]
        metadata = {"lora_adapter_metadata": json.dumps(peft_metadata(unet_layers, text_layers))}
        tensors = lora_files.peft_lora(unet_layers, text_layers, 5)
        return lora_files.save(tensors, tmp_path / "peft_alpha.safetensors", metadata)
    if layout == "old_diffusers":
        return lora_files.save(lora_files.old_diffusers_lora(unet_layers, 6), tmp_path / "old.safetensors")
    raise ValueError(layout)


def peft_metadata(unet_layers, text_layers):
    """diffusers' ``lora_adapter_metadata``: the LoraConfig per component, one module with its own alpha."""
    metadata = {}
    for component, named, alpha in (("unet", unet_layers, 6), ("text_encoder", text_layers, 1)):
        metadata.update({
            f"{component}.r": 2,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": [name for name, _ in named],  # PEFT matches them as suffixes
            f"{component}.alpha_pattern": {named[0][0]: 3} if component == "unet" else {},
        })
    return metadata


LAYOUTS = ["kohya", "kohya_te1_pt", "kohya_compvis_names", "peft", "peft_metadata", "old_diffusers"]


@pytest.mark.parametrize("layout, weight", list(zip(LAYOUTS, [0.7, -0.5, 1.0, 0.8, 1.3, 0.6])))
def test_merged_weights_equal_diffusers_fuse_lora(layout, weight, ours, pipe, tmp_path):
    base_unet, base_text = pipe.unet.state_dict(), pipe.text_encoder.state_dict()
    base_unet = {k: v.clone() for k, v in base_unet.items()}
    base_text = {k: v.clone() for k, v in base_text.items()}
    path = write_layout(layout, pipe, ours, tmp_path)

    applied = apply_loras(ours, [(path, weight)])
    reference_fused(pipe, [(path, weight)])

    worst, changed_ours, changed_ref = compare(ours, pipe, base_unet, base_text)
    assert applied[0][0].unmatched_keys == 0
    assert changed_ours == changed_ref > 0
    assert worst < TOLERANCE, f"{layout}: max |ours - diffusers| = {worst:.2e}"
