"""Which of our modules a LoRA file's key names: the naming layouts LoRA trainers have used for SD v1.

Our UNet keeps CompVis' attribute paths (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``); trainers
name modules after diffusers' ``UNet2DConditionModel`` (``down_blocks.0.attentions.0...``). The map between
the two is built here from the :class:`~ldm.config.UNetConfig` (any ``num_res_blocks`` / ``channel_mult`` /
``attention_resolutions``), not hard-coded for SD v1's 2 blocks per level as the webui's
``convert_diffusers_name_to_compvis`` is; ``tests/test_lora_layouts.py`` checks it against diffusers'
``convert_ldm_unet_checkpoint``.

Spellings registered for every ``Linear`` / ``Conv2d`` (``D`` = diffusers path, ``C`` = CompVis path,
``T`` = CLIP path without ``text_model.``; ``_`` means the dots replaced by underscores):

- kohya sd-scripts / webui: ``lora_unet_{D_}``; ``lora_unet_{C_}`` (files trained on the CompVis /
  sgm UNet, which diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` also accepts); text encoder
  ``lora_te_text_model_{T_}`` and ``lora_te1_text_model_{T_}`` (kohya wrote ``lora_te1_`` for SD v1 between
  its SDXL support and commit 66c03be "Fix TE key names for SD1/2 LoRA", June-July 2023), plus
  ``lora_te_{T_}`` (a CLIP without the ``text_model`` wrapper, transformers >= 5.6).
- diffusers / PEFT: ``unet.{D}``, ``text_encoder.text_model.{T}``, ``text_encoder.{T}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ldm.config import UNetConfig

# CompVis ResBlock slots -> diffusers ResnetBlock2D names.
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TEXT_MODEL_PREFIX = "text_model."


@dataclass(frozen=True)
class LoraTarget:
    """A weight a LoRA can change: ``component`` is "unet" or "text_encoder", ``path`` its module path there."""

    component: str
    path: str
    module: nn.Module


def diffusers_unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, bool]]:
    """``{CompVis block prefix: (diffusers prefix, is_resnet)}`` for every block of a UNet of this config.

    Mirrors ``UNetModel.__init__``: each level has ``num_res_blocks`` input blocks (ResBlock, then a
    SpatialTransformer where ``2**level`` is an attention resolution) and, except the last, a Downsample;
    the output side walks the levels in reverse with one block more, the Upsample riding in the last one.
    """
    blocks: dict[str, tuple[str, bool]] = {
        "time_embed.0": ("time_embedding.linear_1", False),
        "time_embed.2": ("time_embedding.linear_2", False),
        "input_blocks.0.0": ("conv_in", False),
        "out.0": ("conv_norm_out", False),
        "out.2": ("conv_out", False),
        "middle_block.0": ("mid_block.resnets.0", True),
        "middle_block.1": ("mid_block.attentions.0", False),
        "middle_block.2": ("mid_block.resnets.1", True),
    }
    levels, per_level = len(cfg.channel_mult), cfg.num_res_blocks
    index = 1
    for level in range(levels):
        attention = 2**level in cfg.attention_resolutions
        for j in range(per_level):
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", True)
            if attention:
                blocks[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", False)
            index += 1
        if level != levels - 1:
            blocks[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", False)
            index += 1
    index = 0
    for up in range(levels):
        level = levels - 1 - up
        attention = 2**level in cfg.attention_resolutions
        for j in range(per_level + 1):
            blocks[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", True)
            if attention:
                blocks[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", False)
            if level and j == per_level:
                slot = 2 if attention else 1
                blocks[f"output_blocks.{index}.{slot}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", False)
            index += 1
    return blocks


def diffusers_unet_name(compvis_name: str, blocks: dict[str, tuple[str, bool]]) -> str | None:
    """The diffusers name of a CompVis UNet module or weight (``input_blocks.1.0.in_layers.2.weight`` ->
    ``down_blocks.0.resnets.0.conv1.weight``); None for a name outside every block."""
    parts = compvis_name.split(".")
    for cut in range(min(len(parts), 4), 0, -1):  # longest block prefix first
        prefix = ".".join(parts[:cut])
        if prefix not in blocks:
            continue
        target, is_resnet = blocks[prefix]
        rest = ".".join(parts[cut:])
        if is_resnet and rest:
            for compvis_part, diffusers_part in _RESNET_PARTS.items():
                if rest == compvis_part or rest.startswith(compvis_part + "."):
                    rest = diffusers_part + rest[len(compvis_part):]
                    break
        return f"{target}.{rest}" if rest else target
    return None


def lora_targets(unet: nn.Module, text_model: nn.Module, unet_config: UNetConfig) -> dict[str, LoraTarget]:
    """Every spelling of every ``Linear`` / ``Conv2d`` weight a LoRA file may use, mapped to its module.

    ``unet`` is our CompVis-layout UNet, ``text_model`` the ``transformers.CLIPTextModel`` of the text encoder.
    """
    table: dict[str, LoraTarget] = {}
    blocks = diffusers_unet_blocks(unet_config)
    for path, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        target = LoraTarget("unet", path, module)
        diffusers = diffusers_unet_name(path, blocks)
        if diffusers is not None:
            table["lora_unet_" + diffusers.replace(".", "_")] = target
            table["unet." + diffusers] = target
        table["lora_unet_" + path.replace(".", "_")] = target
    for path, module in text_model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        target = LoraTarget("text_encoder", path, module)
        bare = path.removeprefix(TEXT_MODEL_PREFIX)
        flat = bare.replace(".", "_")
        for name in (f"lora_te_text_model_{flat}", f"lora_te1_text_model_{flat}", f"lora_te_{flat}"):
            table[name] = target
        table["text_encoder." + TEXT_MODEL_PREFIX + bare] = target
        table["text_encoder." + bare] = target
    return table


# Dotted (diffusers / PEFT) keys: module path, then the part. Parts are renamed to kohya's spelling.
_DOTTED_PARTS = (
    (re.compile(r"^(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$"), "lora_down.weight"),
    (re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"^(?P<module>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(?P<module>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(?P<module>.+)\.(?:lora_magnitude_vector|dora_scale)(?:\.[^.]+)?(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"^(?P<module>.+)\.alpha$"), "alpha"),
)
# diffusers' attention-processor layout (before PEFT, 2023): ``attn1.processor.to_q_lora.down.weight``;
# its text-encoder form drops ``processor`` and keeps the UNet's projection names.
_PROCESSOR_PART = re.compile(r"^(?P<module>.+?)(?P<processor>\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_CLIP_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
DOTTED_PREFIXES = ("unet.", "text_encoder.")


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(module name, part)`` of a LoRA file key in any known layout, or None for a key of no known layout.

    kohya: ``lora_unet_..._to_q.lora_down.weight`` -> (``lora_unet_..._to_q``, ``lora_down.weight``);
    diffusers / PEFT: ``unet.down_blocks...to_q.lora_A.weight`` -> (``unet.down_blocks...to_q``, ``lora_down.weight``).
    """
    if key.startswith("lora_"):
        module, dot, part = key.partition(".")
        return (module, part) if dot else None
    if not key.startswith(DOTTED_PREFIXES):
        return None
    old = _PROCESSOR_PART.match(key)
    if old is not None:
        names = _CLIP_PROJECTIONS if key.startswith("text_encoder.") else _UNET_PROJECTIONS
        return f"{old['module']}.{names[old['proj']]}", f"lora_{old['part']}.weight"
    for pattern, part in _DOTTED_PARTS:
        found = pattern.match(key)
        if found is not None:
            return found["module"], part
    return None
