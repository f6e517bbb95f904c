"""LoRA files merged into our models equal diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same files.

Both sides start from the same tiny random checkpoint; the files are random, in the real key layouts
(``tests/lora_files.py``). Our merged UNet is converted to diffusers' layout by diffusers' own
``convert_ldm_unet_checkpoint`` and compared weight by weight; the text encoders are the same transformers
class on both sides.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from ldm.loading.lora import apply_loras
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.loading.random_weights import UNET_PREFIX
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
        return lora_files.save(lora_files.peft_lora(unet_layers[::2], text_layers, 4), tmp_path / "peft.safetensors")
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


SLOW = pytest.mark.slow  # each diffusers load_lora_weights costs seconds on 2 cores; these run with -m slow
LAYOUTS = [
    ("kohya", 0.7),
    pytest.param("kohya_te1_pt", -0.5, marks=SLOW),
    ("kohya_compvis_names", 1.0),
    ("peft", 0.8),
    pytest.param("peft_metadata", 1.3, marks=SLOW),
    pytest.param("old_diffusers", 0.6, marks=SLOW),
]


@pytest.mark.parametrize("layout, weight", LAYOUTS)
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


def peft_lycoris_file(kind, model, prefix, seed):
    """A random LyCORIS adapter built by PEFT on ``model`` (diffusers UNet or CLIP), written in kohya's
    layout, and the weights PEFT merges from it: ``(file tensors, {module name: merged weight})``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    targets = [name for name, _ in lora_files.layers(model)]  # PEFT matches them as suffixes
    alpha = 3.0
    alphas = {name: alpha for name in targets}
    if kind == "lora":  # per-layer ranks and alphas, as kohya's resize_lora.py writes them
        alphas.update({name: 1.0 + i % 5 for i, name in enumerate(targets[::2])})
        ranks = {name: 1 + i % 4 for i, name in enumerate(targets[::3])}
        config = LoraConfig(r=2, lora_alpha=alpha, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    elif kind == "loha":  # use_effective_conv2d: the Tucker form (hada_t1 / hada_t2) on 3x3 convs
        config = LoHaConfig(r=2, alpha=alpha, target_modules=targets, use_effective_conv2d=True)
    else:  # w1 full, w2 = w2_a @ w2_b (Tucker with lokr_t2 on 3x3 convs)
        config = LoKrConfig(r=2, alpha=alpha, target_modules=targets, use_effective_conv2d=True, decompose_both=True)
    inject_adapter_in_model(config, model, adapter_name="default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".hada_" in name or ".lokr_" in name or ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    tensors = {}
    kohya_part = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    for key, value in get_peft_model_state_dict(model, adapter_name="default").items():
        module, part = re.fullmatch(r"(.+?)\.(lora_[AB]\.weight|hada_\w+|lokr_\w+)", key).groups()
        name = prefix + module.removeprefix("text_model.").replace(".", "_")
        tensors[f"{name}.{kohya_part.get(part, part)}"] = value
        tensors[f"{name}.alpha"] = torch.tensor(alphas[module.removeprefix("text_model.")])
    return tensors, model


def peft_merged(model, weight):
    """PEFT's own merge of the adapter at ``weight`` (LycorisLayer.set_scale: weight * alpha / r)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale("default", weight)
            module.merge()
            merged[name.removeprefix("text_model.")] = module.get_base_layer().weight.detach().clone()
    return merged


@pytest.mark.parametrize("kind, weight", [("lora", 1.1), ("loha", 0.9), ("lokr", -0.6)])
def test_merge_equals_peft_layers(kind, weight, ours, pipe, tmp_path):
    """PEFT's own layers as the oracle: LoRA with per-layer ranks and alphas (diffusers' kohya converter keeps
    one alpha for all attention layers, so it cannot judge these), LoHa and LoKr (linear, 1x1 and Tucker
    3x3 conv layers), UNet and text encoder."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_tensors, unet = peft_lycoris_file(kind, pipe.unet, "lora_unet_", 11)
    text_tensors, text = peft_lycoris_file(kind, pipe.text_encoder, "lora_te_text_model_", 12)
    if kind == "lora":
        assert len({v.shape[0] for k, v in unet_tensors.items() if k.endswith("lora_down.weight")}) == 4
    elif kind == "loha":
        assert any(k.endswith("hada_t1") for k in unet_tensors)
    else:
        assert any(k.endswith("lokr_t2") for k in unet_tensors) and any(k.endswith("lokr_w2_b") for k in text_tensors)
    path = lora_files.save({**unet_tensors, **text_tensors}, tmp_path / f"{kind}.safetensors")
    apply_loras(ours, [(path, weight)])

    expected = {**peft_merged(unet, weight), **peft_merged(text, weight)}
    got_unet, got_text = diffusers_named(ours, pipe.unet.config)
    got = {**{k.removesuffix(".weight"): v for k, v in got_unet.items()},
           **{k.removesuffix(".weight"): v for k, v in got_text.items()}}
    worst = max(max_abs_diff(got[name], value) for name, value in expected.items())
    assert len(expected) > 100
    assert worst < TOLERANCE, f"{kind}: max |ours - PEFT| = {worst:.2e}"


def test_two_loras_add_as_diffusers_adapters(ours, pipe, tmp_path):
    """Two files at their own weights (one negative) equal diffusers' two adapters fused together."""
    base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    unet_layers, text_layers = lora_files.layers(pipe.unet), lora_files.layers(pipe.text_encoder)
    first = lora_files.save(lora_files.kohya_lora(unet_layers[::2], text_layers, 21), tmp_path / "a.safetensors")
    second = lora_files.save(lora_files.peft_lora(unet_layers[::3], text_layers, 22), tmp_path / "b.safetensors")

    apply_loras(ours, [(first, 0.6), (second, -0.4)])
    reference_fused(pipe, [(first, 0.6), (second, -0.4)])

    worst, changed_ours, changed_ref = compare(ours, pipe, base_unet, base_text)
    assert changed_ours == changed_ref > 0
    assert worst < TOLERANCE, f"max |ours - diffusers| = {worst:.2e}"


def test_weight_zero_leaves_the_model_bit_identical(ours, tiny_checkpoint, tiny_config_path, tmp_path):
    base = load_stable_diffusion(tiny_checkpoint, tiny_config_path)
    unet_layers, text_layers = lora_files.layers(ours.unet), lora_files.layers(ours.text_encoder.transformer)
    path = lora_files.save(lora_files.kohya_lora(unet_layers, text_layers, 31), tmp_path / "z.safetensors")
    apply_loras(ours, [(path, 0.0)])
    for module in ("unet", "vae"):
        for (name, a), (_, b) in zip(getattr(ours, module).state_dict().items(), getattr(base, module).state_dict().items()):
            assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(ours.text_encoder.state_dict().items(), base.text_encoder.state_dict().items()):
        assert torch.equal(a, b), name


def test_merge_is_fp32_then_cast_and_never_writes_the_checkpoint(tiny_checkpoint, tiny_config_path, tmp_path):
    """fp16 model: W' = fp16(fp32(W) + sum of deltas); the memory-mapped file stays as it was."""
    before = tiny_checkpoint.read_bytes()
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, dtype=torch.float16)
    target = sd.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    original = target.weight.detach().clone()
    down, up = torch.randn(4, 32) * 0.2, torch.randn(32, 4) * 0.2
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": down.half(), f"{key}.lora_up.weight": up.half(), f"{key}.alpha": torch.tensor(2.0)}
    path = lora_files.save(tensors, tmp_path / "half.safetensors")
    apply_loras(sd, [(path, 0.5), (path, 0.25)])
    delta = (up.half().float() @ down.half().float()) * (2.0 / 4)
    expected = (original.float() + 0.75 * delta).half()
    assert target.weight.dtype == torch.float16
    assert torch.equal(target.weight, expected)
    assert tiny_checkpoint.read_bytes() == before
