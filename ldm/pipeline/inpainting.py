"""Inpainting: repaint the masked part of an image, with any SD v1 checkpoint.

Two ways, as diffusers' ``StableDiffusionInpaintPipeline`` (and the webui, ComfyUI) do it:

- **4-channel UNet** (any SD v1 checkpoint): after every sampler step the known region of the latent is
  replaced by the init image's latent noised to the level the latent is now at (:class:`LatentBlend`,
  the "blended latent diffusion" of Avrahami, Fried & Lischinski 2023, Sec. 3; RePaint's known-region
  step without resampling, Lugmayr et al. 2022, eq. 8). After the last step the known region is the
  clean init latent.
- **9-channel UNet** (``sd-v1-5-inpainting.ckpt`` and its fine-tunes, CompVis ``LatentInpaintDiffusion``
  with ``conditioning_key: hybrid``): the UNet sees ``[noisy latent, mask, masked-image latent]``
  concatenated on the channel axis (:class:`InpaintingUNet`); nothing is blended.

Masks here are tensors: ``[1 or B, 1, H, W]`` floats in [0, 1], 1 = repaint. Both uses binarize them at 0.5,
as diffusers' mask processor does (``do_binarize``): the masked image zeroes (mid-grey in [-1, 1]) the
pixels to repaint, and the latent-size mask is the binary mask downsampled with nearest-neighbour
interpolation (diffusers ``prepare_mask_latents``: ``F.interpolate`` with its default mode).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.errors import UsageError
from ldm.samplers import sampler_record, walk_levels

log = logging.getLogger(__name__)

UNet = Callable[[Tensor, Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], object]


# ---- mask and masked image, at pixel and latent size ---------------------------------------------------------


def binarize(mask: Tensor) -> Tensor:
    """1 where ``mask >= 0.5`` (repaint), else 0; diffusers' ``VaeImageProcessor.binarize``."""
    return (mask >= 0.5).to(mask.dtype)


def masked_image(pixels: Tensor, mask: Tensor) -> Tensor:
    """The init image with the pixels to repaint set to 0 (mid-grey): ``pixels * (binarize(mask) < 0.5)``,
    the 9-channel UNet's image conditioning (diffusers: ``init_image * (mask_condition < 0.5)``)."""
    if mask.shape[-2:] != pixels.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} and image {tuple(pixels.shape)} differ in size")
    return pixels * (1 - binarize(mask)).to(pixels.dtype)


def latent_mask(mask: Tensor, factor: int = 8) -> Tensor:
    """The binary mask at latent size ``[.., 1, H/factor, W/factor]``: nearest-neighbour downsampling of the
    binarized pixel mask (each latent cell takes its top-left pixel, as ``F.interpolate(mode="nearest")``)."""
    height, width = mask.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"mask size {width}x{height} is not a multiple of {factor}")
    return F.interpolate(binarize(mask.float()), size=(height // factor, width // factor), mode="nearest")


def _per_image(tensor: Tensor, batch: int, what: str) -> Tensor:
    """``tensor`` ([1] or [batch] first axis) repeated to ``batch``."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{what} has batch {tensor.shape[0]}, expected 1 or {batch}")


# ---- 9-channel inpainting UNet --------------------------------------------------------------------------------


class InpaintingUNet:
    """``unet(x, t, context)`` for a 9-channel inpainting UNet: ``x`` (the noisy latent, 4 channels) is
    concatenated with the latent-size mask and the masked image's latent before the UNet runs, as CompVis'
    ``DiffusionWrapper`` does for ``conditioning_key: hybrid`` (``c_concat``) and diffusers does.

    ``mask`` is ``[1 or B, 1, h, w]``, ``masked_latent`` ``[1 or B, 4, h, w]`` (already multiplied by the scale
    factor). Under classifier-free guidance the latent batch is ``k * B`` (both passes in one call); the
    conditioning is repeated ``k`` times, unconditional and conditional passes see the same mask and image.
    """

    def __init__(self, unet: UNet, mask: Tensor, masked_latent: Tensor) -> None:
        if mask.shape[-2:] != masked_latent.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape)} and masked latent {tuple(masked_latent.shape)} differ in size")
        self.unet = unet
        batch = max(mask.shape[0], masked_latent.shape[0])
        self.extra = torch.cat([_per_image(mask, batch, "mask"), _per_image(masked_latent, batch, "masked latent")], 1)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        batch = self.extra.shape[0]
        if x.shape[0] % batch:
            raise ValueError(f"latent batch {x.shape[0]} is not a multiple of the inpainting batch {batch}")
        extra = self.extra.to(device=x.device, dtype=x.dtype).repeat(x.shape[0] // batch, 1, 1, 1)
        return self.unet(torch.cat([x, extra], dim=1), t, context)


# ---- 4-channel per-step blend ---------------------------------------------------------------------------------


class LatentBlend:
    """The known region of the latent replaced, after each step, by the init latent noised to that level.

    After step ``i`` the sampler's latent is at ``levels[i + 1]`` of its grid; the blend is::

        x = mask * x + (1 - mask) * grid.noised(init_latent, noise, levels[i + 1])

    (``sqrt(a) x0 + sqrt(1 - a) noise`` on the timestep grid, ``x0 + sigma noise`` on the sigma grid), with
    ``noise`` the run's initial noise, which diffusers re-uses too (``scheduler.add_noise(image_latents, noise,
    timesteps[i + 1])``). After the last step the known region is the clean init latent, as diffusers leaves
    it (on the timestep grid the walk ends at ``alphas_cumprod[0]``, not at 1).

    ``levels`` is the walk the sampler runs (already cut by ``strength``); call the blend as
    ``blend(step, total, x) -> x``, the samplers' callback signature.
    """

    def __init__(self, init_latent: Tensor, mask: Tensor, noise: Tensor, schedule, grid, levels: Sequence[float]) -> None:
        if len(levels) < 2:
            raise ValueError("a blend needs a walk of at least one step")
        if init_latent.shape != noise.shape:
            raise ValueError(f"init latent {tuple(init_latent.shape)} and noise {tuple(noise.shape)} differ in shape")
        if mask.shape[-2:] != init_latent.shape[-2:]:
            raise ValueError(f"latent mask {tuple(mask.shape)} does not match latent {tuple(init_latent.shape)}")
        self.init_latent = init_latent
        self.mask = _per_image(mask, init_latent.shape[0], "mask")
        self.noise = noise
        self.schedule = schedule
        self.grid = grid
        self.levels = list(levels)

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def known(self, step: int) -> Tensor:
        """The known region's latent after ``step`` (0-based)."""
        if step == self.steps - 1:
            return self.init_latent
        return self.grid.noised(self.schedule, self.init_latent, self.noise, self.levels[step + 1])

    def __call__(self, step: int, total: int, x: Tensor) -> Tensor:
        if total != self.steps:
            raise ValueError(f"blend built for {self.steps} steps, sampler runs {total}")
        mask = self.mask.to(device=x.device, dtype=x.dtype)
        # Not lerp: with a binary mask this form keeps both regions bit-exact (x where 1, known where 0).
        return mask * x + (1 - mask) * self.known(step).to(device=x.device, dtype=x.dtype)


def blend_then(blend: LatentBlend, callback: StepCallback | None = None) -> StepCallback:
    """A sampler callback that returns the blended latent (the sampler continues from it, as diffusers' inpainting
    pipeline replaces its latents after each scheduler step), then calls ``callback`` on it."""

    def call(step: int, total: int, x: Tensor) -> Tensor:
        x = blend(step, total, x)
        if callback is not None:
            callback(step, total, x)
        return x

    return call


def sampler_blend(
    name: str, schedule, steps: int, strength: float, init_latent: Tensor, mask: Tensor, noise: Tensor,
    schedule_type: str = "automatic", img2img_steps: str = "cut",
) -> LatentBlend | None:
    """The blend for ``samplers.sample(name, ..., steps, strength=strength, schedule_type=schedule_type)``: the
    same walk (the sampler's grid on that schedule, cut to its last ``int(strength * steps)`` steps as
    :func:`ldm.samplers.sample` cuts it; where the sampler's steps end elsewhere, ``dpm_fast``, ``restart``, those
    ends), None when that walk has no step. A sampler that picks its steps as it goes (``dpm_adaptive``) has no
    levels to follow: a :class:`~ldm.errors.UsageError`."""
    levels = walk_levels(name, schedule, steps, strength, schedule_type, img2img_steps)
    if len(levels) == 1:
        return None
    record = sampler_record(name)
    if record.adaptive:
        raise UsageError(f"--sampler {name} cannot inpaint with a 4-channel checkpoint: it picks its steps as it goes, "
                         "and the per-step blend needs them beforehand (use another sampler or a 9-channel "
                         "inpainting checkpoint)")
    if record.step_levels is not None:
        levels = record.step_levels(levels)
    return LatentBlend(init_latent, mask, noise, schedule, record.grid, levels)
