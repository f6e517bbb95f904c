"""A VAE from its own file or folder (``--vae``), in the CompVis ``AutoencoderKL`` key layout.

Many fine-tunes ship without a good VAE, and the fix users reach for is a standalone one, in whichever
layout they found it:

- CompVis keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``), with or without the
  ``first_stage_model.`` prefix, as ``.ckpt`` / ``.pt`` / ``.safetensors``; Stability's
  ``vae-ft-mse-840000-ema-pruned`` also carries its training loss (``loss.*``: LPIPS and discriminator),
  dropped here;
- diffusers' ``AutoencoderKL`` keys: its ``diffusion_pytorch_model.safetensors`` alone, or the folder that
  holds it (``vae/`` of a diffusers pipeline, or a VAE saved on its own), mapped by
  :func:`ldm.checkpoints.diffusers_folders.compvis_vae_from_diffusers`;
- a whole SD v1 checkpoint, whose ``first_stage_model.*`` is taken.

The webui does the same (``modules/sd_vae.py`` strips ``first_stage_model.`` and ``loss``); diffusers'
``convert_ldm_vae_checkpoint`` reads the same prefixes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.reader import read_checkpoint
from ldm.checkpoints.kinds import CheckpointKind, inspect_checkpoint
from ldm.checkpoints.layout import EMA_PREFIX, VAE_LOSS_PREFIX, VAE_PREFIX
from ldm.checkpoints.diffusers_folders import MODEL_INDEX, compvis_vae_from_diffusers, looks_like_diffusers_vae, read_component

log = logging.getLogger(__name__)

VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def read_vae_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """CompVis ``AutoencoderKL`` weights (keys without prefix) from a VAE file or folder; see the module docstring."""
    path = Path(path)
    if path.is_dir():
        component = path / "vae" if (path / MODEL_INDEX).is_file() else path
        state = read_component(component)
    else:
        state = read_checkpoint(path)
    return vae_weights_from_state(state, path)


def vae_weights_from_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The VAE part of a flat state dict read from ``path``, in CompVis keys without prefix."""
    contents = inspect_checkpoint(state)
    if contents.kind in (CheckpointKind.SD_V1, CheckpointKind.SD_V1_INPAINTING):
        if not contents.has_vae:
            raise CheckpointError(f"{path}: an {contents.kind.value} without VAE, not a VAE: --vae takes a VAE file")
        log.info("%s is a whole checkpoint: using its VAE", path)
    elif contents.kind is not CheckpointKind.VAE:
        raise CheckpointError(f"{path}: {contents.kind.value}, not a VAE: --vae takes a VAE file or folder")
    prefixed = any(key.startswith(VAE_PREFIX) for key in state)
    weights: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in state.items():
        if prefixed:
            if not key.startswith(VAE_PREFIX):
                continue  # the rest of a whole checkpoint
            key = key[len(VAE_PREFIX):]
        if key.startswith((VAE_LOSS_PREFIX, EMA_PREFIX)):
            continue  # the training loss and EMA bookkeeping of a VAE fine-tune
        if key.startswith(VAE_MODULES):
            weights[key] = value
        else:
            ignored.append(key)
    if ignored:
        log.warning("%s: ignored %d keys that are not VAE weights (%s)", path, len(ignored), ", ".join(sorted(ignored)[:3]))
    if looks_like_diffusers_vae(weights):
        weights = compvis_vae_from_diffusers(weights)
    return weights
