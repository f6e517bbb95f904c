"""What a checkpoint file is, decided from its keys and shapes before any model is built.

Users pass whatever they downloaded as ``--ckpt``: an SD v1 model, but also SD 2.x and SDXL models, a VAE,
a LoRA, an inpainting model. Each needs its own answer ("a VAE: pass it with --vae"), not a list of missing
keys. The signs read here are the ones the CompVis, Stability and kohya layouts leave:

- SDXL (``sgm``): ``conditioner.embedders.*`` text encoders; its UNet has ``label_emb`` (the size embedding).
- SD 2.x: the OpenCLIP text encoder under ``cond_stage_model.model.*``; its UNet's cross-attention
  takes 1024-wide context (SD v1: CLIP ViT-L/14, 768).
- SD v1: ``model.diffusion_model.*`` (or only LitEma's ``model_ema.diffusion_model*`` copy) with
  ``cond_stage_model.transformer.*``; the inpainting model's first conv takes 9 channels (latent 4,
  masked-image latent 4, mask 1), instruct-pix2pix's 8.
- A VAE alone: ``encoder.*`` / ``decoder.*`` (CompVis or diffusers names), possibly under
  ``first_stage_model.``, possibly with its training loss under ``loss.``.
- A LoRA / LyCORIS: kohya's ``lora_unet_*`` / ``lora_te_*`` with ``lora_down`` / ``lora_up``, PEFT's
  ``lora_A`` / ``lora_B``, LyCORIS' ``hada_*`` / ``lokr_*``.
- One model of a diffusers folder (``diffusion_pytorch_model.safetensors``): ``conv_in`` and
  ``time_embedding`` at the top level.

:func:`classify_checkpoint` gives the kind; :func:`inspect_checkpoint` also what the file holds, and
:func:`refusal` the one-line answer for a file a run cannot use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from safetensors import safe_open

from ldm.checkpoints.reader import read_checkpoint
from ldm.checkpoints.layout import EMA_UNET_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_LOSS_PREFIX, VAE_PREFIX

SD_V1_CONTEXT_DIM = 768  # CLIP ViT-L/14
SD_V2_CONTEXT_DIM = 1024  # OpenCLIP ViT-H/14
INPAINTING_IN_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent
UNET_FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
INPAINT_SCRIPT = "optimizedSD/optimized_inpaint.py"

_LORA_KEY = re.compile(
    r"^lora_(unet|te\d?)_"  # kohya / the webui
    r"|[._]lora_(down|up|mid|A|B)[._]"  # kohya, PEFT / diffusers
    r"|[._]lora\.(down|up)\."  # diffusers' old attention processors (to_k_lora.down)
    r"|\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|oft_blocks|oft_diag|lora_magnitude_vector)$"
)
_SDXL_UNET_KEYS = (UNET_PREFIX + "label_emb.0.0.weight", "add_embedding.linear_1.weight")


class CheckpointKind(Enum):
    """What a file is; the value is how messages name it."""

    SD_V1 = "SD v1 checkpoint"
    SD_V1_INPAINTING = "SD v1 inpainting checkpoint"
    SD_V2 = "SD 2.x checkpoint (OpenCLIP text encoder)"
    SDXL = "SDXL checkpoint"
    VAE = "a VAE"
    LORA = "a LoRA"
    DIFFUSERS_MODEL = "one model of a diffusers-format folder"
    UNKNOWN = "not a Stable Diffusion checkpoint"


@dataclass(frozen=True)
class CheckpointContents:
    """The kind of a file and which of the three models' weights it holds."""

    kind: CheckpointKind
    has_unet: bool = False  # model.diffusion_model.*
    has_ema_unet: bool = False  # model_ema.diffusion_model*
    has_vae: bool = False
    has_text_encoder: bool = False
    unet_in_channels: int | None = None
    context_dim: int | None = None

    @property
    def ema_only(self) -> bool:
        return self.has_ema_unet and not self.has_unet


def classify_checkpoint(state: Mapping[str, torch.Tensor]) -> CheckpointKind:
    """The :class:`CheckpointKind` of a flat ``{key: tensor}`` state dict (see the module docstring)."""
    return inspect_checkpoint(state).kind


def inspect_checkpoint(state: Mapping[str, torch.Tensor]) -> CheckpointContents:
    """Kind and contents of a flat state dict, from key names and two shapes (no model is built)."""
    keys = list(state)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    has_ema_unet = any(k.startswith(EMA_UNET_PREFIX) for k in keys)
    contents = dict(
        has_unet=has_unet,
        has_ema_unet=has_ema_unet,
        has_vae=any(k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + VAE_LOSS_PREFIX) for k in keys),
        has_text_encoder=any(k.startswith(TEXT_PREFIX) for k in keys),
        unet_in_channels=unet_in_channels(state),
        context_dim=_context_dim(state),
    )
    return CheckpointContents(kind=_kind(state, keys, has_unet or has_ema_unet, contents), **contents)


def _kind(state: Mapping[str, torch.Tensor], keys: list[str], has_unet: bool, contents: dict) -> CheckpointKind:
    if any(k.startswith("conditioner.embedders.") for k in keys) or any(k in state for k in _SDXL_UNET_KEYS):
        return CheckpointKind.SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys) or contents["context_dim"] == SD_V2_CONTEXT_DIM:
        return CheckpointKind.SD_V2
    if has_unet:
        if contents["unet_in_channels"] is None:
            return CheckpointKind.UNKNOWN  # a model.diffusion_model of another architecture (SD3, Flux, ...)
        if contents["unet_in_channels"] == INPAINTING_IN_CHANNELS:
            return CheckpointKind.SD_V1_INPAINTING
        return CheckpointKind.SD_V1
    if any(_LORA_KEY.search(k) for k in keys):
        return CheckpointKind.LORA
    if any(k.endswith("decoder.conv_out.weight") for k in keys) and any(k.endswith("encoder.conv_in.weight") for k in keys):
        return CheckpointKind.VAE
    if "conv_in.weight" in state and "time_embedding.linear_1.weight" in state:
        return CheckpointKind.DIFFUSERS_MODEL
    return CheckpointKind.UNKNOWN


def unet_in_channels(state: Mapping[str, torch.Tensor]) -> int | None:
    """Input channels of the UNet's first conv (``input_blocks.0.0``, ``[320, C, 3, 3]``), from the plain or the
    EMA copy; None when the file has neither (not an SD v1 file)."""
    for key in (UNET_FIRST_CONV, EMA_UNET_PREFIX + "input_blocks00weight"):
        weight = state.get(key)
        if weight is not None and weight.ndim == 4:
            return int(weight.shape[1])
    return None


def is_inpainting_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True for an inpainting checkpoint (UNet with 9 input channels: latent, mask, masked-image latent)."""
    return unet_in_channels(state) == INPAINTING_IN_CHANNELS


def checkpoint_unet_in_channels(path: str | Path) -> int | None:
    """:func:`unet_in_channels` of a file, without reading its weights: a safetensors header, or the
    memory-mapped tensors of a ``.ckpt`` (only one shape is looked at). Raises ``CheckpointError`` as
    :func:`ldm.checkpoints.reader.read_checkpoint` does for a file it cannot read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if UNET_FIRST_CONV not in handle.keys():
                return None
            shape = handle.get_slice(UNET_FIRST_CONV).get_shape()
        return int(shape[1]) if len(shape) == 4 else None
    except Exception:  # not safetensors (or damaged): the checked reader says what is wrong
        return unet_in_channels(read_checkpoint(path))


def _context_dim(state: Mapping[str, torch.Tensor]) -> int | None:
    """Width of the cross-attention context: the input size of the first ``attn2.to_k`` of the UNet."""
    for key, value in state.items():
        is_unet = key.startswith(UNET_PREFIX) or key.startswith(EMA_UNET_PREFIX)
        if is_unet and (key.endswith("attn2.to_k.weight") or key.endswith("attn2to_kweight")) and value.ndim == 2:
            return int(value.shape[1])
    return None


def refusal(contents: CheckpointContents, in_channels: int = 4, vae_given: bool = False) -> str | None:
    """Why a run with a UNet of ``in_channels`` inputs cannot use this file, and what to do; None if it can.

    ``vae_given``: a VAE comes from ``--vae``, so a file without one is fine.
    """
    kind = contents.kind
    if kind in (CheckpointKind.SD_V2, CheckpointKind.SDXL):
        return f"{kind.value}: not supported; this program runs SD v1.x models"
    if kind is CheckpointKind.VAE:
        return "a VAE: pass it with --vae, and an SD v1 checkpoint with --ckpt"
    if kind is CheckpointKind.LORA:
        return "a LoRA: pass it with --lora, and an SD v1 checkpoint with --ckpt"
    if kind is CheckpointKind.DIFFUSERS_MODEL:
        return f"{kind.value}: pass the folder that holds model_index.json with --ckpt"
    if kind is CheckpointKind.UNKNOWN:
        return "not a Stable Diffusion v1 checkpoint (no model.diffusion_model.input_blocks.* UNet weights)"
    mismatch = _channel_mismatch(contents.unet_in_channels, in_channels)
    if mismatch:
        return mismatch
    if not contents.has_text_encoder:
        return "no text encoder (cond_stage_model.transformer.*) in this file: not a complete SD v1 checkpoint"
    if not contents.has_vae and not vae_given:
        return "no VAE in this file: pass one with --vae"
    return None


def _channel_mismatch(found: int | None, expected: int) -> str | None:
    if found is None or found == expected:
        return None
    if found == INPAINTING_IN_CHANNELS:
        return f"an inpainting checkpoint: use {INPAINT_SCRIPT}"
    if expected == INPAINTING_IN_CHANNELS:
        return f"an SD v1 checkpoint whose UNet takes {found} input channels: inpainting needs an inpainting checkpoint (9)"
    hint = " (instruct-pix2pix's layout)" if found == 8 else ""
    return f"an SD v1 checkpoint whose UNet takes {found} input channels{hint}, where the config expects {expected}: not supported"
