"""What inpainting adds to a generation run, as one input preparer the generation loop calls at its stages.

- before the model loads (:meth:`InpaintingInputs.prepare`): the mask read, resized, inverted and blurred
  (:mod:`ldm.pipeline.masks`), so a bad mask fails in a second, not after the load;
- once per run (:meth:`InpaintingInputs.encode`): the init image, and for a 9-channel UNet the masked image,
  through the VAE's encoder alone (:func:`ldm.pipeline.prepare.encode_images`: in low mode nothing else is on the
  device; with ``--backend openvino``, OpenVINO's encoder);
- per batch (:meth:`InpaintingInputs.start`): the posterior samples drawn from each image's own generator (the
  init image's where it is used, then the masked image's), and what the sampler needs: the UNet wrapped to take
  9 channels, or the per-step blend of the known region (:mod:`ldm.pipeline.inpainting`);
- per image (:meth:`InpaintingInputs.finish`): the overlay of the init image's kept pixels (unless ``no_overlay``).

Draw order per image (one CPU generator per seed, :class:`ldm.samplers.noise.SeededNoise`): the start noise, then the
init image's posterior sample (4-channel UNet, or strength < 1), then the masked image's (9-channel UNet), then
the ancestral samplers' fresh noise. With ``latents=`` and that generator, diffusers'
``StableDiffusionInpaintPipeline`` draws the same (tests/test_cli_inpaint.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.models.autoencoder import DiagonalGaussian
from ldm.pipeline.batches import BatchStart
from ldm.pipeline.inpainting import InpaintingUNet, latent_mask, masked_image, sampler_blend
from ldm.pipeline.masks import apply_overlay, init_pixels, load_mask, mask_tensor

log = logging.getLogger(__name__)


class InpaintingInputs:
    """The init image and mask of a run, at the output size, and what is made of them."""

    def __init__(self, pixels: np.ndarray, mask: np.ndarray, *, blur: float, overlay: bool) -> None:
        self.pixels = pixels  # uint8 [H, W, 3]: the init image as the model sees it, and the overlay's source
        self.mask = mask  # float32 [H, W] in [0, 1] after invert and blur; 1 = repaint
        self.blur = blur
        self.overlay = overlay
        self.nine_channel = False
        self.image_posterior = None
        self.masked_posterior = None

    @classmethod
    def prepare(cls, init_image: Image.Image, mask_path: str | Path, width: int, height: int, *, invert: bool = False,
                blur: float = 4, overlay: bool = True) -> "InpaintingInputs":
        """Read the mask (a :class:`~optimizedSD.arguments.UsageError` when it is missing, unreadable or has
        nothing to repaint) and size both to ``width`` x ``height``."""
        mask = load_mask(mask_path, width, height, invert=invert, blur=blur)
        return cls(init_pixels(init_image, width, height), mask, blur=blur, overlay=overlay)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``([1, 3, H, W]`` image in [-1, 1], ``[1, 1, H, W]`` mask)."""
        image = torch.from_numpy(self.pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
        return image, mask_tensor(self.mask)

    @torch.no_grad()
    def encode(self, encode_images: Callable[[list[Tensor]], list[DiagonalGaussian]], *, nine_channel: bool,
               needs_init: bool) -> None:
        """The VAE posteriors, once per run, by ``encode_images`` (:func:`ldm.pipeline.prepare.encode_images`: only
        the VAE's encoder on the device, in tiles where the run's decode tiles): the init image's when
        ``needs_init`` (a 4-channel UNet, or strength < 1), the masked image's for a 9-channel UNet."""
        self.nine_channel = nine_channel
        image, mask = self.tensors()
        wanted = ([image] if needs_init else []) + ([masked_image(image, mask)] if nine_channel else [])
        posteriors = iter(encode_images(wanted))
        if needs_init:
            self.image_posterior = next(posteriors)
        if nine_channel:
            self.masked_posterior = next(posteriors)

    def start(self, noise, x_T: Tensor, scale_factor: float, *, sampler: str, schedule, steps: int, strength: float,
              schedule_type: str = "automatic", img2img_steps: str = "cut"):
        """One batch's :class:`~ldm.pipeline.batches.BatchStart`: the posterior samples drawn from each image's
        generator (init image first, where used, then masked image), the 9-channel UNet's extra inputs bound to
        it, or the 4-channel per-step blend over the sampler's walk."""
        small_mask = latent_mask(mask_tensor(self.mask)).to(x_T.device)
        init_latent = None
        if self.image_posterior is not None:
            init_latent = scale_factor * self.image_posterior.sample(noise(x_T)).float()
        if self.nine_channel:
            masked_latent = scale_factor * self.masked_posterior.sample(noise(x_T))
            return BatchStart(init_latent, wrap_unet=lambda unet: InpaintingUNet(unet, small_mask, masked_latent))
        blend = sampler_blend(sampler, schedule, steps, strength, init_latent, small_mask, x_T, schedule_type,
                              img2img_steps)
        return BatchStart(init_latent, after_step=blend)

    def finish(self, image: np.ndarray) -> np.ndarray:
        """One decoded uint8 image, with the init image's pixels laid back through the blurred mask."""
        return apply_overlay(image, self.pixels, self.mask) if self.overlay else image

    def metadata(self) -> dict[str, str]:
        """The webui's infotext fields for inpainting."""
        return {"Mask blur": str(int(self.blur) if float(self.blur).is_integer() else self.blur)}
