"""diffusers-format model folders, mapped to this project's CompVis key layout in memory.

A folder ``save_pretrained`` writes holds ``model_index.json`` and one folder per component; the three
models we need are ``unet/`` and ``vae/`` (``diffusion_pytorch_model[.fp16].safetensors`` or ``.bin``,
possibly sharded behind a ``*.index.json``) and ``text_encoder/`` (transformers' ``model.safetensors`` or
``pytorch_model.bin``). Every file goes through :func:`ldm.checkpoints.reader.read_checkpoint` (memory-mapped
safetensors; ``.bin`` through the restricted unpickler), and the keys are renamed to what a CompVis
checkpoint holds, so the single loader path (:mod:`ldm.loading.stable_diffusion`) builds the models.

The renaming is the inverse of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``
(``diffusers/loaders/single_file_utils.py``), derived from the keys themselves (number of levels, blocks per
level, which levels have attention), so no config is needed:

UNet (CompVis ``openaimodel.UNetModel``; ``n`` = blocks per level)
  ``conv_in`` -> ``input_blocks.0.0``; ``time_embedding.linear_{1,2}`` -> ``time_embed.{0,2}``;
  ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.{1 + i(n+1) + j}.{0,1}``;
  ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.{(i+1)(n+1)}.0.op``;
  ``mid_block.resnets.0 / attentions.0 / resnets.1`` -> ``middle_block.0 / 1 / 2``;
  ``up_blocks.i.{resnets,attentions}.j`` -> ``output_blocks.{i(n+1) + j}.{0,1}`` (n+1 blocks per level);
  ``up_blocks.i.upsamplers.0.conv`` -> the last block of the level, slot 1 or 2 (after an attention);
  ``conv_norm_out`` / ``conv_out`` -> ``out.0`` / ``out.2``. Inside a ResBlock ``norm1, conv1,
  time_emb_proj, norm2, conv2, conv_shortcut`` are ``in_layers.0, in_layers.2, emb_layers.1, out_layers.0,
  out_layers.3, skip_connection``; the transformer blocks have the same names on both sides.
VAE (CompVis ``AutoencoderKL``, whose decoder's ``up`` is indexed by resolution level: reversed)
  ``{en,de}coder.{down,up}_blocks.i.resnets.j`` -> ``encoder.down.i.block.j`` / ``decoder.up.{L-1-i}.block.j``;
  ``downsamplers.0`` / ``upsamplers.0`` -> ``downsample`` / ``upsample``; ``mid_block.resnets.{0,1}`` ->
  ``mid.block_{1,2}``; ``mid_block.attentions.0`` -> ``mid.attn_1`` with ``group_norm, to_q (query), to_k
  (key), to_v (value), to_out.0 (proj_attn)`` -> ``norm, q, k, v, proj_out``, whose linear [C, C] weights
  become the 1x1 convs [C, C, 1, 1] CompVis uses; ``conv_norm_out`` -> ``norm_out``;
  ``conv_shortcut`` -> ``nin_shortcut``.
Text encoder: ``transformers.CLIPTextModel`` keys (with or without ``text_model.``) under
  ``cond_stage_model.transformer.text_model.``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.reader import read_checkpoint
from ldm.checkpoints.layout import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_VARIANTS = ("", ".fp16")  # the plain files first, then the half-precision variant
_SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q", "query": "q",
    "to_k": "k", "key": "k",
    "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def is_diffusers_folder(path: Path) -> bool:
    """``path`` is a folder holding ``model_index.json`` (a diffusers pipeline saved by ``save_pretrained``)."""
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def read_diffusers_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text-encoder weights of a diffusers folder under CompVis checkpoint keys.

    A component folder that is missing leaves its keys out, so the loader's usual message follows
    ("no VAE in this file: pass one with --vae"). SDXL folders and v-prediction schedulers are refused here.
    """
    folder = Path(folder)
    index = _read_json(folder / MODEL_INDEX)
    pipeline = str(index.get("_class_name", ""))
    if "XL" in pipeline or any(name in index for name in _SDXL_COMPONENTS):
        raise CheckpointError(f"{folder}: SDXL checkpoint ({pipeline or 'two text encoders'}): not supported; this program runs SD v1.x models")
    _refuse_v_prediction(folder)
    state: dict[str, torch.Tensor] = {}
    if (folder / "unet").is_dir():
        state.update((UNET_PREFIX + k, v) for k, v in compvis_unet_from_diffusers(read_component(folder / "unet")).items())
    else:
        raise CheckpointError(f"{folder}: a diffusers folder without unet/: nothing to generate with")
    if (folder / "vae").is_dir():
        state.update((VAE_PREFIX + k, v) for k, v in compvis_vae_from_diffusers(read_component(folder / "vae")).items())
    if (folder / "text_encoder").is_dir():
        text = compvis_text_from_transformers(read_component(folder / "text_encoder"))
        state.update((TEXT_PREFIX + k, v) for k, v in text.items())
    log.info("%s: diffusers folder (%s) mapped to the CompVis layout", folder, pipeline or "unknown pipeline")
    return state


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot read {path}: not a JSON object")
    return data


def _refuse_v_prediction(folder: Path) -> None:
    """SD v1 predicts the noise (eps); a scheduler saying v_prediction belongs to SD 2.x-v style models."""
    config = folder / "scheduler" / "scheduler_config.json"
    if config.is_file() and _read_json(config).get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{folder}: its scheduler predicts {_read_json(config)['prediction_type']}, "
                              "not the noise (epsilon) as SD v1 does: not supported")


def read_component(component: Path) -> dict[str, torch.Tensor]:
    """The weights of one component folder (``unet/``, ``vae/``, ``text_encoder/``), as stored."""
    files = weight_files(component)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_checkpoint(file))
    return state


def weight_files(component: Path) -> list[Path]:
    """The file(s) holding a component's weights: safetensors before ``.bin``, plain before ``.fp16``.

    A sharded save is named by its ``*.index[.fp16].json``, whose ``weight_map`` lists shard files that
    must lie in the same folder.
    """
    for variant in _VARIANTS:
        for suffix in (".safetensors", ".bin"):
            for stem in _WEIGHT_STEMS:
                single = component / f"{stem}{variant}{suffix}"
                if single.is_file():
                    return [single]
                index = component / f"{stem}{suffix}.index{variant}.json"
                if index.is_file():
                    return _shards(index)
    present = sorted(p.name for p in component.iterdir()) if component.is_dir() else []
    raise CheckpointError(f"{component}: no weights file found (have: {', '.join(present) or 'nothing'})")


def _shards(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"cannot read {index}: no weight_map")
    names = sorted(set(map(str, weight_map.values())))
    for name in names:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard {name!r} is not a file name in the same folder")
    return [index.parent / name for name in names]


# ---- UNet --------------------------------------------------------------------------------------------


def compvis_unet_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to CompVis ``UNetModel`` keys (tensors shared).

    Keys that fit no rule keep their name, so the strict load reports them.
    """
    per_level = 1 + max((int(m.group(4)) for m in map(_BLOCK.match, state) if m and m.group(1) == "down_blocks"
                         and m.group(3) == "resnets"), default=-1)
    up_with_attention = {int(m.group(2)) for m in map(_BLOCK.match, state) if m and m.group(1) == "up_blocks"
                         and m.group(3) == "attentions"}
    return {_unet_key(key, per_level, up_with_attention): value for key, value in state.items()}


def _unet_key(key: str, n: int, up_with_attention: set[int]) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    mid = _MID.match(key)
    if mid:
        kind, index, rest = mid.groups()
        slot = 1 if kind == "attentions" else 2 * int(index)
        return f"middle_block.{slot}.{_resnet_rest(rest) if kind == 'resnets' else rest}"
    block = _BLOCK.match(key)
    if not block:
        return key
    side, level, kind, index, rest = block.groups()
    level, index = int(level), int(index)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (n + 1)}.0.{rest.replace('conv.', 'op.', 1)}"
        position = 1 + level * (n + 1) + index
    else:
        if kind == "upsamplers":
            slot = 2 if level in up_with_attention else 1
            return f"output_blocks.{level * (n + 1) + n}.{slot}.{rest}"
        position = level * (n + 1) + index
    if kind == "resnets":
        return f"{'input' if side == 'down_blocks' else 'output'}_blocks.{position}.0.{_resnet_rest(rest)}"
    return f"{'input' if side == 'down_blocks' else 'output'}_blocks.{position}.1.{rest}"


def _resnet_rest(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET_NAMES.get(name, name)}.{tail}"


# ---- VAE ---------------------------------------------------------------------------------------------


def looks_like_diffusers_vae(state: dict[str, torch.Tensor]) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state)


def compvis_vae_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to CompVis ``AutoencoderKL`` keys (tensors shared)."""
    levels = 1 + max((int(m.group(1)) for m in map(re.compile(r"^decoder\.up_blocks\.(\d+)\.").match, state) if m),
                     default=-1)
    out = {}
    for key, value in state.items():
        new = _vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1] (a view)
        out[new] = value
    return out


def _vae_key(key: str, levels: int) -> str:
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest[len('conv_norm_out.'):]}"
    mid = _MID.match(rest)
    if mid:
        kind, index, tail = mid.groups()
        if kind == "resnets":
            return f"{coder}.mid.block_{int(index) + 1}.{tail.replace('conv_shortcut.', 'nin_shortcut.', 1)}"
        for old, new in _VAE_ATTENTION_NAMES.items():
            if tail.startswith(old + "."):
                return f"{coder}.mid.attn_1.{new}{tail[len(old):]}"
        return f"{coder}.mid.attn_1.{tail}"
    block = _BLOCK.match(rest)
    if not block:
        return key
    side, level, kind, index, tail = block.groups()
    level = int(level) if side == "down_blocks" else levels - 1 - int(level)
    stage = "down" if side == "down_blocks" else "up"
    if kind in ("downsamplers", "upsamplers"):
        return f"{coder}.{stage}.{level}.{kind[:-2]}.{tail}"  # downsamplers -> downsample
    return f"{coder}.{stage}.{level}.block.{index}.{tail.replace('conv_shortcut.', 'nin_shortcut.', 1)}"


# ---- text encoder ------------------------------------------------------------------------------------


def compvis_text_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` keys (transformers 4.x ``text_model.*`` or 5.x bare) as SD v1 files spell them."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
