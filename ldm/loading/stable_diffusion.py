"""Build the three SD v1 models from a checkpoint file or a diffusers folder, strictly.

Steps, each its own function:

1. read the weights: a ``.ckpt`` / ``.safetensors`` (:func:`ldm.checkpoints.reader.read_checkpoint`) or a
   diffusers folder mapped to the CompVis layout in memory (:mod:`ldm.checkpoints.diffusers_folders`);
2. decide what the file is from its keys and shapes (:mod:`ldm.checkpoints.kinds`) and refuse, in one line
   that says what to do, an SD 2.x / SDXL model, a VAE, a LoRA, an inpainting model for a 4-channel config,
   a file without VAE when no ``--vae`` is given;
3. split the keys by prefix (:mod:`ldm.checkpoints.layout`): UNet, its EMA copy, VAE, text encoder, schedule
   buffers; training leftovers are dropped, and keys that belong to none of the models are ignored with
   one warning line that counts them;
4. build each model on the meta device and assign the file's tensors in the run's dtype one at a time, each
   copied out of the file's memory map and the map's pages given back as it goes (:func:`owned_copy`), so no
   second full copy of the weights is held and a file rewritten during the run cannot crash it. Missing,
   unexpected and mis-shaped keys of a model are errors naming them (CompVis loaded with ``strict=False``,
   and a broken file produced noise instead of an error);
5. the noise schedule comes from the config, computed in float64 as diffusers and ComfyUI do; the file's
   buffers are only compared with it (one warning line when they disagree beyond their dtype's rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.taesd import TinyAutoencoder
from ldm.checkpoints.diffusers_folders import is_diffusers_folder, read_diffusers_folder
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.reader import read_checkpoint
from ldm.checkpoints.vae_files import is_tiny_vae, read_vae_weights
from ldm.checkpoints.kinds import inspect_checkpoint, refusal
from ldm.checkpoints.layout import (
    EMA_PREFIX,
    SCHEDULE_BUFFERS,
    TEXT_PREFIX,
    TRAINING_LEFTOVER_KEYS,
    UNET_PREFIX,
    VAE_LOSS_PREFIX,
    VAE_PREFIX,
    ema_key,
    is_unused_text_key,
)
from ldm.config import DEFAULT_CONFIG, ModelConfig, load_model_config
from ldm.checkpoints.mapped_pages import FileMappings
from ldm.samplers.schedule import DiffusionSchedule
from ldm.conditioning.text_encoder import CLIPTextEncoder, normalize_text_encoder_keys
from ldm.models.unet import UNetModel

log = logging.getLogger(__name__)

@dataclass
class StableDiffusion:
    """The loaded model: three modules, the noise schedule and the latent scale factor."""

    unet: UNetModel
    vae: AutoencoderKL | TinyAutoencoder
    text_encoder: CLIPTextEncoder
    schedule: DiffusionSchedule
    scale_factor: float
    config: ModelConfig
    checkpoint_path: Path | None = None
    used_ema: bool = False
    vae_path: Path | None = None  # the --vae file or folder, when the VAE did not come from the checkpoint

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """float64 [timesteps], from the config (see the module docstring)."""
        return self.schedule.alphas_cumprod


@dataclass
class CheckpointParts:
    """A flat CompVis state dict split by model; keys have their model's prefix stripped."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # LitEma names, "model_ema." stripped
    vae: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor] = field(default_factory=dict)
    schedule_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # belong to no model: warned about, not loaded


def split_checkpoint(state: dict[str, torch.Tensor]) -> CheckpointParts:
    """Sort every key of a CompVis-layout state dict into :class:`CheckpointParts` (nothing is copied)."""
    parts = CheckpointParts()
    for key, value in state.items():
        if key in SCHEDULE_BUFFERS:
            parts.schedule_buffers[key] = value
        elif key in TRAINING_LEFTOVER_KEYS or key.startswith(VAE_PREFIX + VAE_LOSS_PREFIX):
            continue
        elif key.startswith(UNET_PREFIX):
            parts.unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(EMA_PREFIX):
            parts.ema[key[len(EMA_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts.vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(TEXT_PREFIX) and not is_unused_text_key(key[len(TEXT_PREFIX):]):
            parts.text[key[len(TEXT_PREFIX):]] = value
        else:
            parts.ignored.append(key)
    return parts


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_strict(module: nn.Module, weights: dict[str, torch.Tensor], what: str, path: Path, dtype: torch.dtype,
                 copy: bool = True) -> None:
    """Assign ``weights`` to a meta-device ``module``; any key or shape disagreement is a CheckpointError."""
    _check_keys(module, weights, what, path)
    pages = FileMappings()
    for key in list(weights):
        tensor = weights.pop(key)
        if copy:
            weights[key] = owned_copy(tensor, dtype, pages)
        else:  # a tensor already in dtype stays a view into the file's map, until own_weights
            weights[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    module.load_state_dict(weights, strict=True, assign=True)
    for name, buffer in module.named_buffers():
        if buffer.is_meta:
            raise CheckpointError(f"{path}: {what} buffer {name} was not set by the checkpoint")


def _check_keys(module: nn.Module, weights: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """A CheckpointError naming every key of ``module`` missing from ``weights``, every unexpected one and every
    shape that differs."""
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


def empty_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter and floating-point buffer of ``module`` (on ``meta``) an empty CPU tensor of ``dtype``: the
    state of a UNet whose weights an engine holds (:func:`ldm.backends.openvino_unet.release_weights`)."""
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            owner._parameters[name] = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        for name, buffer in owner.named_buffers(recurse=False):
            owner._buffers[name] = torch.empty(0, dtype=dtype if buffer.is_floating_point() else buffer.dtype)


def owned_copy(tensor: torch.Tensor, dtype: torch.dtype, pages: FileMappings) -> torch.Tensor:
    """``tensor`` (floating point: in ``dtype``) in memory of its own, never a view into the checkpoint's memory
    map, whose pages are then given back. A mapped weight would make a file truncated or rewritten during the
    run kill the process with SIGBUS, which Python cannot turn into a message; the copy costs no memory
    after loading, since the mapped pages leave as the copies come (docs/hostile-inputs.md has the figures)."""
    copy = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
    pages.drop(tensor)  # the file's pages of this tensor leave the process (ldm/checkpoints/mapped_pages.py)
    return copy


def _build_models(cfg: ModelConfig, parts: CheckpointParts, use_ema: bool, path: Path, vae_path: Path | None, dtype: torch.dtype,
                  copy: bool, with_unet: bool = True) -> tuple[tuple[UNetModel, bool], AutoencoderKL, CLIPTextEncoder]:
    """The three models, built on meta and given the file's weights strictly; ``((unet, used_ema), vae, text)``;
    without ``with_unet`` the UNet's weights are checked, not read (:func:`empty_weights`)."""
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    unet_weights, used_ema = choose_unet_weights(parts, list(unet.state_dict()), use_ema, path)
    if with_unet:
        _load_strict(unet, unet_weights, "UNet", path, dtype, copy)
    else:
        _check_keys(unet, unet_weights, "UNet", path)
        empty_weights(unet, dtype)
    with torch.device("meta"):
        autoencoder = vae_model(cfg, parts.vae)
    _load_strict(autoencoder, parts.vae, "VAE", vae_path or path, dtype, copy)
    with torch.device("meta"):
        text_encoder = CLIPTextEncoder(cfg.text)
    _rebuild_position_ids(text_encoder)
    expected = list(text_encoder.transformer.state_dict())
    _load_strict(text_encoder.transformer, normalize_text_encoder_keys(parts.text, expected), "text encoder", path,
                 dtype, copy)
    for module in (unet, autoencoder, text_encoder):
        module.eval().requires_grad_(False)
    return (unet, used_ema), autoencoder, text_encoder


def vae_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> AutoencoderKL | TinyAutoencoder:
    """The autoencoder ``weights`` are for: TAESD's (diffusers' ``AutoencoderTiny`` keys, the encoder
    optional) or the config's KL autoencoder."""
    if is_tiny_vae(weights):
        return TinyAutoencoder(with_encoder=any(key.startswith("encoder.") for key in weights))
    return AutoencoderKL(cfg.vae)


def own_weights(*modules: nn.Module) -> int:
    """Copy every parameter and buffer of ``modules`` that is still a view into a checkpoint's memory map
    into memory of its own (:func:`owned_copy`); after ``load_stable_diffusion(copy_weights=False)`` and
    whatever replaced most weights first. Returns the number of tensors copied."""
    pages, copied = FileMappings(), 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if pages.holds(tensor):
                tensor.data = owned_copy(tensor.data, tensor.dtype, pages)
                copied += 1
    return copied


def _rebuild_position_ids(text_encoder: nn.Module) -> None:
    """transformers keeps CLIP's ``position_ids`` as a non-persistent buffer: no file sets it, so make it here."""
    for module in text_encoder.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape).clone()


def choose_unet_weights(
    parts: CheckpointParts, unet_keys: list[str], use_ema: bool, path: Path
) -> tuple[dict[str, torch.Tensor], bool]:
    """The UNet's weights and whether they are LitEma's copy.

    The plain weights unless ``use_ema`` and the file has an EMA copy; a file with only the EMA copy
    is loaded with it either way, and says so.
    """
    if parts.unet and not (use_ema and parts.ema):
        if use_ema:
            log.info("%s has no EMA weights: using its plain UNet weights", path)
        return parts.unet, False
    ema = {key: parts.ema.get(ema_key(key)[len(EMA_PREFIX):]) for key in unet_keys}
    absent = [key for key, value in ema.items() if value is None]
    if absent:
        raise CheckpointError(f"{path}: EMA weights incomplete (no EMA copy of {_describe(absent)})")
    if parts.unet:
        log.info("using the EMA weights of %s for the UNet", path)
    else:
        log.warning("%s holds only EMA weights for the UNet (model_ema.*): using them", path)
    return ema, True


def _schedule(cfg: ModelConfig, buffers: dict[str, torch.Tensor], path: Path) -> DiffusionSchedule:
    """The config's schedule; a stored ``alphas_cumprod`` that is not the same up to rounding is reported."""
    schedule = DiffusionSchedule.from_config(cfg.schedule)
    stored = buffers.get("alphas_cumprod")
    if stored is not None and not schedule.matches_buffer(stored):
        log.warning(
            "%s: its alphas_cumprod buffer differs from the schedule the config describes; "
            "sampling with the config's (as diffusers and ComfyUI do)", path
        )
    return schedule


def read_model_weights(checkpoint: Path, unread_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A checkpoint file's flat state dict, or a diffusers folder's weights in the CompVis layout;
    ``unread_prefixes`` as :func:`ldm.checkpoints.reader.read_checkpoint`'s."""
    if is_diffusers_folder(checkpoint):
        return read_diffusers_folder(checkpoint)
    if checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: a folder without model_index.json: --ckpt takes a checkpoint file "
                              "or a diffusers model folder")
    return read_checkpoint(checkpoint, unread_prefixes)


def load_stable_diffusion(
    checkpoint: str | Path,
    config: str | Path | ModelConfig = DEFAULT_CONFIG,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
    vae: str | Path | None = None,
    copy_weights: bool = True,
    unet_weights: bool = True,
) -> StableDiffusion:
    """Load an SD v1.x ``.ckpt`` / ``.safetensors`` file or diffusers folder into CPU modules of ``dtype``.

    ``use_ema``: take the UNet from the file's ``model_ema.*`` copy when it has one. Off by default:
    CompVis' scripts (``use_ema: False`` in v1-inference.yaml), diffusers' ``from_single_file`` and
    AUTOMATIC1111 all sample with the plain weights, so the same seed gives the same picture.
    ``vae``: a VAE file or diffusers VAE folder used instead of the checkpoint's own
    (:func:`ldm.checkpoints.vae_files.read_vae_weights`). Raises :class:`CheckpointError` with a one-line message.
    ``copy_weights=False``: weights already in ``dtype`` stay views into the file's memory map, for a caller
    that replaces most of them first (``--quantize`` reads each fp32 layer once into int8 and gives its
    pages back, so the load never holds the fp32 UNet) and then calls :func:`own_weights`.
    ``unet_weights=False``: the UNet's keys, shapes and dtypes are checked as always, but its weights are not
    copied (nor, from a checkpoint file, scanned for NaN) and its tensors are left empty, for a caller whose engine
    already holds them (``--backend openvino``'s cache).
    """
    path = Path(checkpoint)
    cfg = config if isinstance(config, ModelConfig) else load_model_config(config)
    state = read_model_weights(path, () if unet_weights else (UNET_PREFIX, EMA_PREFIX))  # no NaN scan of unread weights
    reason = refusal(inspect_checkpoint(state), cfg.unet.in_channels, vae_given=vae is not None)
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    parts = split_checkpoint(state)
    del state
    if parts.ignored:
        log.warning("%s: ignored %d keys that belong to none of the three models (%s)",
                    path, len(parts.ignored), _describe(sorted(parts.ignored), 3))
    vae_path = Path(vae) if vae is not None else None
    if vae_path is not None:
        parts.vae = read_vae_weights(vae_path)
        log.info("using the VAE of %s instead of the checkpoint's", vae_path)

    (unet, used_ema), autoencoder, text_encoder = _build_models(cfg, parts, use_ema, path, vae_path, dtype, copy_weights,
                                                                 unet_weights)
    # TAESD decodes the UNet's latents as they are (AutoencoderTiny's scaling_factor is 1.0).
    scale_factor = 1.0 if isinstance(autoencoder, TinyAutoencoder) else cfg.scale_factor
    return StableDiffusion(
        unet=unet,
        vae=autoencoder,
        text_encoder=text_encoder,
        schedule=_schedule(cfg, parts.schedule_buffers, path),
        scale_factor=scale_factor,
        config=cfg,
        checkpoint_path=path,
        used_ema=used_ema,
        vae_path=vae_path,
    )
