"""The decode stage: latents to pixels one image at a time (each with its own out-of-memory ladder), the
safety checker over a batch's images, and each image handed to the run's sink as soon as it exists, so that
images already written stay when a later one fails and the VAE holds one image's activations."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from ldm.memory.out_of_memory import decode_with_retry, retry_lower
from ldm.memory.residency import Residency
from ldm.memory.vae_decoding import DEFAULT_TILE, decode_latents
from ldm.pipeline.batches import Batch
from ldm.pipeline.model import LoadedModel

log = logging.getLogger(__name__)


class ImageSink(Protocol):
    """Where decoded images go (the scripts' ``RunOutputs``; the VRAM ledger's discard)."""

    def pixels(self, decoded: torch.Tensor) -> np.ndarray: ...

    def add(self, batch: Batch, k: int, decoded: torch.Tensor) -> None: ...

    def add_pixels(self, batch: Batch, k: int, image: np.ndarray, safety: str | None = None) -> None: ...


def decode_image(residency: Residency, latent: torch.Tensor, scale_factor: float, tiled: bool,
                 tile: int | None) -> torch.Tensor:
    """One image's latent -> pixels in [-1, 1]; in overlapping tiles with ``--vae_tiling`` or for large images,
    and again in fp32 if the fp16 VAE overflows."""
    with residency.use("vae.decoder") as vae, torch.no_grad():
        return decode_latents(vae, latent / scale_factor, tiled, tile or DEFAULT_TILE)


def decode_one(model: LoadedModel, latent: torch.Tensor, tiled: bool, tile: int | None) -> torch.Tensor:
    """One image's latent -> pixels in [-1, 1]: by ``--backend openvino``'s decoder when whole (one that fails is
    dropped for the rest of the run: PyTorch decodes, and the sampled latents are not lost), else
    :func:`decode_image`."""
    if model.vae_decoder_engine is not None and not tiled:
        try:
            return model.vae_decoder_engine(latent / model.sd.scale_factor)
        except RuntimeError as error:  # OpenVINO's compile or inference
            log.warning("decoding in PyTorch: the OpenVINO VAE decoder failed (%s)", error)
            model.vae_decoder_engine = None
    return decode_image(model.residency, latent, model.sd.scale_factor, tiled, tile)


def decode_and_write(model: LoadedModel, batch: Batch, latents: torch.Tensor, tiled: bool, sink: ImageSink) -> None:
    """Decode the batch one image at a time and hand each to ``sink``; with the safety checker, the batch's images
    go through it together (it comes onto the device once per batch)."""
    residency = model.residency
    decoded_images = []
    for k in range(len(batch.seeds)):
        latent = latents[k : k + 1]
        decoded = decode_with_retry(residency, lambda tiled, tile: decode_one(model, latent, tiled, tile), tiled)
        if model.safety is None:
            sink.add(batch, k, decoded)
        else:
            decoded_images.append(sink.pixels(decoded))  # overlay first: a flagged image is black all over
    if model.safety is not None:
        checked = retry_lower(residency, lambda: model.safety.check(residency, decoded_images))
        for k, (image, verdict) in enumerate(checked):
            sink.add_pixels(batch, k, image, model.safety.metadata(verdict))
