"""The prepare stage: the run's input preparer, its images encoded once (img2img's init image, inpainting's
mask and masked image); per batch it gives a :class:`~ldm.pipeline.batches.BatchStart`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from ldm.checkpoints.kinds import INPAINTING_IN_CHANNELS
from ldm.memory.vae_encoding import encode_pixels
from ldm.models.autoencoder import DiagonalGaussian
from ldm.pipeline.batches import BatchStart
from ldm.pipeline.images import image_to_tensor
from ldm.pipeline.inpaint_inputs import InpaintingInputs
from ldm.pipeline.model import LoadedModel
from ldm.pipeline.request import GenerationRequest
from ldm.samplers.noise import SeededNoise

log = logging.getLogger(__name__)


def encode_images(model: LoadedModel, images: Sequence[torch.Tensor], dtype: torch.dtype,
                  tiled: bool) -> list[DiagonalGaussian]:
    """Each ``[1, 3, H, W]`` image's VAE posterior: through ``--backend openvino``'s encoder when the run has one
    and the images are whole (one that fails is dropped: PyTorch encodes), else PyTorch's encoder, on the device
    alone (``residency.use``), in tiles with ``tiled`` (:func:`~ldm.memory.vae_encoding.encode_pixels`)."""
    if model.vae_encoder_engine is not None and not tiled:
        try:
            return [DiagonalGaussian(model.vae_encoder_engine(pixels)) for pixels in images]
        except RuntimeError as error:  # OpenVINO's compile or inference: dropped for the rest of the run
            log.warning("encoding in PyTorch: the OpenVINO VAE encoder failed (%s)", error)
            model.vae_encoder_engine = None
    with model.residency.use("vae.encoder") as vae:
        return [encode_pixels(vae, pixels, model.residency.device, dtype, tiled) for pixels in images]


@dataclass
class InitImage:
    """img2img's start: the init image's VAE posterior (encoded once), sampled per image with its seed."""

    posterior: DiagonalGaussian
    scale_factor: float

    @classmethod
    def encode(cls, image: Image.Image, width: int, height: int, model: LoadedModel, dtype: torch.dtype,
               tiled: bool = False) -> InitImage:
        """The image's posterior, in tiles with ``tiled`` (the same posterior: :mod:`ldm.memory.vae_encoding`)."""
        (posterior,) = encode_images(model, [image_to_tensor(image, width, height)], dtype, tiled)
        return cls(posterior, model.sd.scale_factor)

    def latent(self, noise: SeededNoise, x_T: torch.Tensor) -> torch.Tensor:
        """The images' init latents; each image's generator draws its posterior sample right after its x_T."""
        return self.scale_factor * self.posterior.sample(noise(x_T)).float()

    def start(self, noise: SeededNoise, x_T: torch.Tensor, scale_factor: float, **walk) -> BatchStart:
        return BatchStart(self.latent(noise, x_T))


def prepare_init(request: GenerationRequest, model: LoadedModel, init_image: Image.Image | None, width: int,
                 height: int, inpainting: InpaintingInputs | None = None,
                 tiled: bool = False) -> InitImage | InpaintingInputs | None:
    """The run's input preparer, its images encoded once: img2img's ``InitImage``, inpainting's ``InpaintingInputs``
    (the init image where it is used, the masked image for a 9-channel UNet), or None (txt2img)."""
    if inpainting is not None:
        nine = model.sd.config.unet.in_channels == INPAINTING_IN_CHANNELS
        inpainting.encode(lambda images: encode_images(model, images, request.dtype, tiled), nine_channel=nine,
                          needs_init=not nine or request.strength < 1)
        return inpainting
    if request.img2img:
        return InitImage.encode(init_image, width, height, model, request.dtype, tiled)
    return None
