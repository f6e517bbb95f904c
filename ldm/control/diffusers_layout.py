"""A diffusers ``ControlNetModel`` state dict under lllyasviel's (CompVis) keys: the inverse of diffusers'
``convert_controlnet_checkpoint`` (``diffusers/loaders/single_file_utils.py``).

The encoder's keys (``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block``) are the UNet's, renamed by
:func:`ldm.checkpoints.diffusers_folders.compvis_unet_from_diffusers`; the ControlNet's own:

- ``controlnet_cond_embedding.conv_in`` -> ``input_hint_block.0``; ``.blocks.i`` -> ``input_hint_block.{2i + 2}``;
  ``.conv_out`` -> ``input_hint_block.14`` (the SiLUs hold the odd slots);
- ``controlnet_down_blocks.i`` -> ``zero_convs.i.0``; ``controlnet_mid_block`` -> ``middle_block_out.0``.
"""

from __future__ import annotations

import re

import torch

from ldm.checkpoints.diffusers_folders import compvis_unet_from_diffusers

MARK = "controlnet_cond_embedding.conv_in.weight"
_HINT_BLOCK = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.(.+)$")
_ZERO = re.compile(r"^controlnet_down_blocks\.(\d+)\.(.+)$")
_FIXED = {
    "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
    "controlnet_cond_embedding.conv_out.": "input_hint_block.14.",
    "controlnet_mid_block.": "middle_block_out.0.",
}


def looks_like_diffusers_control(state: dict[str, torch.Tensor]) -> bool:
    return MARK in state


def compvis_control_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key (tensors shared); keys that fit no rule keep their name, so the strict load names them."""
    own: dict[str, torch.Tensor] = {}
    encoder: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        renamed = _own_key(key)
        if renamed is None:
            encoder[key] = value
        else:
            own[renamed] = value
    return {**compvis_unet_from_diffusers(encoder), **own}


def _own_key(key: str) -> str | None:
    for old, new in _FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    block = _HINT_BLOCK.match(key)
    if block:
        return f"input_hint_block.{2 * int(block.group(1)) + 2}.{block.group(2)}"
    zero = _ZERO.match(key)
    if zero:
        return f"zero_convs.{zero.group(1)}.0.{zero.group(2)}"
    return None
