"""Build the three SD v1 models from a CompVis-layout checkpoint, strictly.

A checkpoint is split by prefix: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (CLIP text), plus the DDPM schedule buffers. Every key must land:
missing, unexpected and mis-shaped keys are reported by name (CompVis loaded with ``strict=False``, and a
broken file produced noise instead of an error). Models are built on the meta device and the file's
tensors are assigned in the requested dtype one at a time, so no second full copy of the weights is held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.autoencoder import AutoencoderKL
from ldm.checkpoint_file import CheckpointError, read_checkpoint
from ldm.config import DEFAULT_CONFIG, ModelConfig, load_model_config
from ldm.schedule import DiffusionSchedule
from ldm.random_checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ddpm_schedule_buffers
from ldm.text_encoder import CLIPTextEncoder, normalize_text_encoder_keys
from ldm.unet import UNetModel

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
SCHEDULE_KEYS = frozenset(ddpm_schedule_buffers(ModelConfig().schedule))
# Keys real files carry that inference has no use for: EMA bookkeeping, the training loss (VAE
# fine-tunes ship their discriminator), learned-logvar and conditioning-schedule leftovers.
IGNORED_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates", "logvar", "cond_ids", "scale_factor", "lvlb_weights"})
IGNORED_PREFIXES = ("first_stage_model.loss.",)


@dataclass
class StableDiffusion:
    """The loaded model: three modules, the noise schedule and the latent scale factor."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    alphas_cumprod: torch.Tensor  # float64 [timesteps]
    scale_factor: float
    config: ModelConfig
    checkpoint_path: Path | None = None
    used_ema: bool = False


def _ema_key(unet_key: str) -> str:
    """LitEma's name for a UNet weight: dots removed (``model_ema.diffusion_modelinput_blocks00weight``)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _take_prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries under ``prefix``, with the prefix stripped."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix):]: state.pop(k) for k in keys}


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_strict(module: nn.Module, weights: dict[str, torch.Tensor], what: str, path: Path, dtype: torch.dtype) -> None:
    """Assign ``weights`` to a meta-device ``module``; any key or shape disagreement is a CheckpointError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {what} keys ({_describe(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} {what} keys ({_describe(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} {what} shapes differ from the config ({_describe(mismatched, 3)})")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; does --config match this checkpoint?")
    for key in list(weights):
        tensor = weights.pop(key)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        weights[key] = tensor
    module.load_state_dict(weights, strict=True, assign=True)
    for name, buffer in module.named_buffers():
        if buffer.is_meta:
            raise CheckpointError(f"{path}: {what} buffer {name} was not set by the checkpoint")


def _rebuild_position_ids(text_encoder: nn.Module) -> None:
    """transformers keeps CLIP's ``position_ids`` as a non-persistent buffer: no file sets it, so make it here."""
    for module in text_encoder.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape).clone()


def split_checkpoint(state: dict[str, torch.Tensor], path: Path, use_ema: bool = False):
    """Split a flat CompVis state dict into (unet, vae, text, alphas_cumprod or None, used_ema)."""
    state = {
        k: v
        for k, v in state.items()
        if k not in SCHEDULE_KEYS or k == "alphas_cumprod"
        if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)
    }
    alphas_cumprod = state.pop("alphas_cumprod", None)
    unet = _take_prefixed(state, UNET_PREFIX)
    ema = _take_prefixed(state, EMA_PREFIX)
    used_ema = False
    if use_ema and ema:
        ema_weights = {k: ema.get(_ema_key(k)[len(EMA_PREFIX):]) for k in unet}
        absent = [k for k, v in ema_weights.items() if v is None]
        if absent:
            raise CheckpointError(f"{path}: EMA weights incomplete (no EMA copy of {_describe(absent)})")
        unet, used_ema = ema_weights, True
        log.info("using the checkpoint's EMA weights for the UNet")
    vae = _take_prefixed(state, VAE_PREFIX)
    text = _take_prefixed(state, TEXT_PREFIX)
    if not unet:
        raise CheckpointError(f"{path}: no UNet weights (model.diffusion_model.*): not an SD v1 checkpoint")
    if state:
        raise CheckpointError(f"{path}: unexpected {len(state)} keys ({_describe(sorted(state))})")
    return unet, vae, text, alphas_cumprod, used_ema


def load_stable_diffusion(
    checkpoint: str | Path,
    config: str | Path | ModelConfig = DEFAULT_CONFIG,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
) -> StableDiffusion:
    """Load an SD v1.x ``.ckpt`` / ``.safetensors`` into CPU modules of ``dtype``, in eval mode.

    ``use_ema``: take the UNet from the file's ``model_ema.*`` copy when it has one. Off by default:
    CompVis' scripts (``use_ema: False`` in v1-inference.yaml), diffusers' ``from_single_file`` and
    AUTOMATIC1111 all sample with the plain weights, so the same seed gives the same picture.
    """
    path = Path(checkpoint)
    cfg = config if isinstance(config, ModelConfig) else load_model_config(config)
    unet_w, vae_w, text_w, alphas_cumprod, used_ema = split_checkpoint(read_checkpoint(path), path, use_ema)

    with torch.device("meta"):
        unet, vae = UNetModel(cfg.unet), AutoencoderKL(cfg.vae)
    _load_strict(unet, unet_w, "UNet", path, dtype)
    _load_strict(vae, vae_w, "VAE", path, dtype)
    with torch.device("meta"):
        text_encoder = CLIPTextEncoder(cfg.text)
    _rebuild_position_ids(text_encoder)
    expected = list(text_encoder.transformer.state_dict())
    _load_strict(text_encoder.transformer, normalize_text_encoder_keys(text_w, expected), "text encoder", path, dtype)

    if alphas_cumprod is None:
        alphas_cumprod = DiffusionSchedule.from_config(cfg.schedule).alphas_cumprod
    elif alphas_cumprod.shape != (cfg.schedule.timesteps,):
        raise CheckpointError(f"{path}: alphas_cumprod has shape {tuple(alphas_cumprod.shape)}, config says {cfg.schedule.timesteps} steps")
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        alphas_cumprod=alphas_cumprod.to(torch.float64),
        scale_factor=cfg.scale_factor,
        config=cfg,
        checkpoint_path=path,
        used_ema=used_ema,
    )
