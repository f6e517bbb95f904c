"""Every memory estimate made before a run, in one place: the models' weight bytes, the working memory of
one UNet call and one decode (rules of thumb for ``--vram auto``), the crude upper bound of a batch part
(before the VRAM ledger is asked, :mod:`ldm.ledger.batch_parts`), and the reserves and safety factor that
stand for what no estimate counts. Measurements come from the VRAM ledger (:mod:`ldm.ledger`); these figures
only decide when to ask it, or stand in where nothing can be simulated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.config import ModelConfig
from ldm.memory.module_groups import tensors_of
from ldm.memory.vae_decoding import DEFAULT_TILE

# SD v1 parameter counts (exact, tests/test_sd_v1_shapes.py), for estimates made before a model is loaded.
SD_V1_PARAMETERS = {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}
# What the allocators' slack and the kernels' scratch add to the tensors an estimate or the ledger counts.
SAFETY = 1.2
# Device memory besides the estimate: the CUDA context's share, kernels' workspaces, allocator fragmentation.
DEVICE_RESERVE_BYTES = 512 << 20
# Host memory besides a batch part's tensors: Python objects, PNG encoding, the progress bars.
HOST_RESERVE_BYTES = 256 << 20
UNET_LIVE_TENSORS = 48  # skips, GroupNorm's fp32 copies, the feed-forward's 8x width: live at the latent size
VAE_LIVE_TENSORS = 8  # a convolution holds input and output at the image size at once


def model_bytes(sd=None, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Weight bytes per model: measured from ``sd`` when given, else SD v1's parameter counts in ``dtype``."""
    if sd is not None:
        models = {"text_encoder": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
        return {name: sum(t.numel() * t.element_size() for t in tensors_of([m])) for name, m in models.items()}
    size = torch.empty((), dtype=dtype).element_size()
    return {name: count * size for name, count in SD_V1_PARAMETERS.items()}


def working_bytes(height: int, width: int, batch: int, dtype: torch.dtype = torch.float16, tiled: bool = False) -> dict[str, int]:
    """Rough activation memory of one UNet call (classifier-free guidance doubles the batch) and one VAE
    decode, for SD v1's widths. Rules of thumb, not measurements: the OOM fallback covers misses.

    UNet: about 48 live tensors of 320 channels at the latent size (skips, GroupNorm's fp32 copies,
    the feed-forward's 8x width), plus one 64 MiB attention slice. VAE: one image at a time (the
    generator decodes and encodes images singly, whatever the batch), about 8 tensors of 256 channels at
    the image size: the decoder's last level has 128, but its convolutions hold input and output at once.
    ``tiled``: the VAE decodes 512 px tiles, so a tile's size counts, not the image's.
    """
    size = torch.empty((), dtype=dtype).element_size()
    latent = (height // 8) * (width // 8)
    unet = 2 * batch * latent * 320 * size * UNET_LIVE_TENSORS + (64 << 20)
    if tiled:
        height, width = min(height, DEFAULT_TILE * 8), min(width, DEFAULT_TILE * 8)
    vae = height * width * 256 * size * VAE_LIVE_TENSORS
    return {"unet": unet, "vae": vae, "text_encoder": 2 * batch * 77 * 768 * size * 16}


@dataclass(frozen=True)
class PartMemory:
    """Bytes one part of a batch needs: ``weights + fixed + images * per_image``; ``weights``: what the memory
    mode holds on a CUDA device at the peak (0 on a CPU, whose weights are in memory already)."""

    fixed: int
    per_image: int
    weights: int = 0

    def need(self, images: int) -> int:
        return int((self.weights + self.fixed + images * self.per_image) * SAFETY) + HOST_RESERVE_BYTES

    def images_within(self, available: int) -> int:
        """The most images ``available`` bytes hold (0: not even one)."""
        spare = (available - HOST_RESERVE_BYTES) / SAFETY - self.weights - self.fixed
        return max(0, int(spare // max(self.per_image, 1)))


def rough_bytes(cfg: ModelConfig, height: int, width: int, dtype: torch.dtype, unet_bs: int | None, weights: int) -> PartMemory:
    """An upper bound without the ledger (about 6x the ledger's count for SD v1 at 512 px): 48 tensors of the
    UNet's widest channels at the latent size per UNet row, 8 of the VAE's widest at the (tile's) image size."""
    size = torch.empty((), dtype=dtype).element_size()
    latent = (height // cfg.downsampling_factor) * (width // cfg.downsampling_factor)
    rows_per_image = 2  # classifier-free guidance: prompt and negative prompt
    activation_row = latent * cfg.unet.model_channels * max(cfg.unet.channel_mult) * size * UNET_LIVE_TENSORS
    tile_px = min(height, 1024) * min(width, 1024)  # larger images decode in tiles
    vae = tile_px * cfg.vae.ch * max(cfg.vae.ch_mult) * size * VAE_LIVE_TENSORS + image_bytes(height, width)
    conditioning = 2 * 77 * cfg.unet.context_dim * size * 4
    state = latent * cfg.latent_channels * 4 * 12  # fp32 latents: noise, x, denoised, sampler history
    per_image = rows_per_image * activation_row + conditioning + state
    if unet_bs:
        return PartMemory(max(vae, unet_bs * activation_row), conditioning + state, weights)
    return PartMemory(vae, per_image, weights)


def image_bytes(height: int, width: int) -> int:
    """One decoded image as the loop holds it: fp32 pixels and their 8-bit copy."""
    return 3 * height * width * (4 + 1)
