"""Latents to pixels: tiled decoding for large images, and an fp32 retry when the fp16 VAE overflows.

SD v1's VAE decoder in fp16 can overflow to inf/NaN on some latents (the reason diffusers ships
``force_upcast`` and AUTOMATIC1111 ``--no-half-vae``); :func:`decode_latents` then decodes that image
again with an fp32 copy of the VAE instead of writing a black or garbage picture.

Tiling: large images are decoded in overlapping latent tiles, seams blended linearly.

The decoder's peak memory grows with the image area (its 512-channel activations at full resolution
dominate), so a 2048 px image needs ~16x the memory of a 512 px one. Decoding tiles of
``tile`` latents with ``overlap`` latents shared between neighbours bounds the peak by the tile size.
Each output pixel is the weighted mean of the tiles covering it; weights ramp linearly across the
overlap, so no seam shows. Because GroupNorm statistics are per tile, the result differs slightly from
a whole-image decode (as diffusers' ``enable_vae_tiling`` does); with one tile covering the whole
latent it is identical.
"""

from __future__ import annotations

import logging

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.memory.streaming import StreamedVAE

log = logging.getLogger(__name__)

DEFAULT_TILE = 64  # latents: 512 px, the size SD v1's VAE was trained at
DEFAULT_OVERLAP = 16
SMALL_TILE = 32  # 256 px: the last resort when a whole image does not fit the device
AUTO_TILING_PIXELS = 1024  # tile automatically when a side is larger than this


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blend weights: rising over the first ``overlap`` entries and falling over the last, where a
    neighbouring tile shares them; strictly positive so every pixel has weight."""
    weights = torch.ones(length, dtype=torch.float32)
    steps = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
    if overlap and ramp_start:
        weights[:overlap] = steps
    if overlap and ramp_end:
        weights[-overlap:] = steps.flip(0)
    return weights


def decode_tiled(
    vae: AutoencoderKL, latents: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """Decode unscaled ``latents`` [B, C, h, w] tile by tile; returns images [B, 3, 8h, 8w] like ``vae.decode``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    factor = vae.config.downsampling_factor
    batch, _, height, width = latents.shape
    rows = _starts(height, tile, tile - overlap)
    cols = _starts(width, tile, tile - overlap)
    if len(rows) == len(cols) == 1:
        return vae.decode(latents)
    out = torch.zeros(batch, vae.config.out_ch, height * factor, width * factor, device=latents.device)
    total = torch.zeros(1, 1, height * factor, width * factor, device=latents.device)
    for top in rows:
        for left in cols:
            th, tw = min(tile, height), min(tile, width)
            piece = vae.decode(latents[:, :, top : top + th, left : left + tw]).float()
            wy = _ramp(th * factor, overlap * factor, top > 0, top + th < height)
            wx = _ramp(tw * factor, overlap * factor, left > 0, left + tw < width)
            weight = (wy[:, None] * wx[None, :]).to(latents.device)
            y, x = top * factor, left * factor
            out[:, :, y : y + th * factor, x : x + tw * factor] += piece * weight
            total[:, :, y : y + th * factor, x : x + tw * factor] += weight
    return (out / total).to(piece.dtype)


def should_tile(height: int, width: int, requested: bool) -> bool:
    """Tile when asked, and always above ``AUTO_TILING_PIXELS`` on a side."""
    return requested or max(height, width) > AUTO_TILING_PIXELS


def overflowed(images: torch.Tensor) -> bool:
    """True if any value is inf or NaN. A ``meta`` tensor (the VRAM ledger's simulated run) has no values:
    it counts as finite, the case of every run that does not overflow; the check's own memory is counted."""
    finite = torch.isfinite(images).all()
    return not finite.is_meta and not bool(finite)


def decode_latents(vae: AutoencoderKL | StreamedVAE, latents: torch.Tensor, tiled: bool = False, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Unscaled ``latents`` -> images in [-1, 1] (tiled when asked, in tiles of ``tile`` latents); a
    half-precision VAE that overflows is retried in fp32 (a temporary fp32 copy on the latents' device), so
    the result is always finite. ``vae`` is the model, or low mode's :class:`StreamedVAE`."""
    if tiled:
        overlap = min(DEFAULT_OVERLAP, tile // 4)

        def decode(model, z):
            return decode_tiled(model, z, tile, overlap)
    else:

        def decode(model, z):
            return model.decode(z)

    images = decode(vae, latents)
    if vae.dtype in (torch.float16, torch.bfloat16) and overflowed(images):
        log.warning("the %s VAE overflowed; decoding this image again in fp32", vae.dtype)
        del images
        images = decode(vae.fp32_copy(latents.device), latents.float())
    return images
