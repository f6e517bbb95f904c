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
- a whole SD v1 checkpoint, whose ``first_stage_model.*`` is taken;
- TAESD, the tiny autoencoder (:mod:`ldm.models.taesd`): diffusers' ``AutoencoderTiny`` file or folder
  (keys ``encoder.layers.*``, ``decoder.layers.*``, returned as they are), or the original
  ``taesd_decoder.pth`` / ``taesd_encoder.pth`` (their folder, or either file: the other is looked for next to
  it; a decoder alone decodes, img2img then asks for the encoder).

The webui does the same (``modules/sd_vae.py`` strips ``first_stage_model.`` and ``loss``); diffusers'
``convert_ldm_vae_checkpoint`` reads the same prefixes.
"""

from __future__ import annotations

import json
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


TINY_VAE_PARTS = ("encoder.layers.", "decoder.layers.")
TAESD_FILES = {"encoder": "taesd_encoder.pth", "decoder": "taesd_decoder.pth"}


def read_vae_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """CompVis ``AutoencoderKL`` weights (keys without prefix) from a VAE file or folder, or a TAESD's in
    diffusers' ``AutoencoderTiny`` keys (:func:`is_tiny_vae` tells them apart); see the module docstring."""
    path = Path(path)
    if path.is_dir() and (path / TAESD_FILES["decoder"]).is_file():
        return read_taesd_halves(path / TAESD_FILES["decoder"], read_checkpoint(path / TAESD_FILES["decoder"]))
    if path.is_dir():
        component = path / "vae" if (path / MODEL_INDEX).is_file() else path
        state = read_component(component)
    else:
        state = read_checkpoint(path)
    if is_tiny_vae(state):
        return state
    if taesd_half(state) is not None:
        return read_taesd_halves(path, state)
    return vae_weights_from_state(state, path)


TINY_FILE_BYTES = 64 << 20  # TAESD is 2.4M parameters (10 MB in fp32); the smallest KL VAE file is 80 MB


def vae_is_tiny(path: str | Path) -> bool:
    """Whether ``--vae``'s file or folder is a TAESD (``--plan`` then counts its memory, not the KL VAE's), without
    reading a large file: a file under :data:`TINY_FILE_BYTES` is read and told by its keys (any TAESD layout), a
    larger one never is a TAESD; a diffusers folder by its ``config.json``'s class. Raises :class:`CheckpointError`
    for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--vae not found: {path}")
    if path.is_dir():
        if (path / TAESD_FILES["decoder"]).is_file():
            return True
        config = (path / "vae" if (path / MODEL_INDEX).is_file() else path) / "config.json"
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderTiny"
        except (OSError, ValueError, AttributeError):  # no config.json, or not the JSON object diffusers writes
            return False
    return path.stat().st_size < TINY_FILE_BYTES and is_tiny_vae(read_vae_weights(path))


def is_tiny_vae(state: dict[str, torch.Tensor]) -> bool:
    """diffusers' ``AutoencoderTiny`` keys, and nothing else."""
    return bool(state) and all(key.startswith(TINY_VAE_PARTS) for key in state)


def taesd_half(state: dict[str, torch.Tensor]) -> str | None:
    """"encoder" or "decoder" for an original TAESD file (a bare ``nn.Sequential``'s keys ``N.*``): the
    encoder's first conv takes 3 image channels, the decoder's (slot 1, after its ``Clamp``) 4 latent ones."""
    if not state or not all(key.split(".", 1)[0].isdigit() for key in state):
        return None
    first = state.get("0.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 3:
        return "encoder"
    first = state.get("1.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 4:
        return "decoder"
    return None


def read_taesd_halves(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One original TAESD file's weights and its other half's (``taesd_encoder.pth`` next to
    ``taesd_decoder.pth``, or the name with ``encoder``/``decoder`` swapped), in ``AutoencoderTiny`` keys.
    The decoder is required; without an encoder the result has only ``decoder.layers.*``."""
    half = taesd_half(state)
    other = "encoder" if half == "decoder" else "decoder"
    sibling = path.with_name(path.name.replace(half, other)) if half in path.name else path.with_name(TAESD_FILES[other])
    halves = {half: state}
    if sibling.is_file() and sibling != path:
        other_state = read_checkpoint(sibling)
        if taesd_half(other_state) != other:
            raise CheckpointError(f"{sibling}: not a TAESD {other}, though it lies next to the {half} {path.name}")
        halves[other] = other_state
    if "decoder" not in halves:
        raise CheckpointError(f"{path}: a TAESD encoder without its decoder ({TAESD_FILES['decoder']} next to it)")
    weights = {}
    for part, part_state in halves.items():
        weights.update(tiny_keys_from_original(part, part_state))
    return weights


def tiny_keys_from_original(part: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original TAESD half's keys in diffusers' ``AutoencoderTiny`` layout: the decoder's indices shift
    down by one (the original's slot 0 is a ``Clamp`` without weights, which diffusers runs in ``forward``)."""
    shift = 1 if part == "decoder" else 0
    renamed = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        renamed[f"{part}.layers.{int(index) - shift}.{rest}"] = value
    return renamed


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
