"""Pixels to the VAE posterior in tiles, equal to the whole-image encode up to float rounding.

The encoder's memory is at the top of its down path: at 1024 px, SD v1's first level holds several 128-channel
full-resolution tensors at once (1.26 GiB of activations in fp16). Its down path has only 3x3 convolutions, the
stride-2 downsamplings and GroupNorms (no attention: the config's ``attn_resolutions`` is empty for the down
levels); a convolution's output tile needs only its input tile and a one-pixel halo, but a GroupNorm needs its
statistics over the whole picture. So the down path runs layer by layer: each segment (GroupNorm + SiLU +
convolution, the residual added; or the input convolution; or a downsampling) is computed tile by tile on the
device from halo'd tiles of its input, and its whole output is parked in host memory (:class:`Parked`) while the
next GroupNorm's statistics are gathered from the output tiles (per-tile mean and variance merged pairwise, Chan,
Golub & LeVeque 1979). The mid block (its attention sees the whole picture), ``norm_out``, ``conv_out`` and
``quant_conv`` then run whole at the latent resolution, 1/64 of the pixels. Nothing is approximated: the result is
the whole encode's up to the order of float additions (tests/test_vae_encoding.py states the tolerance).

Others tile differently: diffusers' ``AutoencoderKL.tiled_encode`` normalizes each tile with its own statistics
and blends overlapping tiles (not the whole encode's result); the webui's Tiled VAE (multidiffusion-upscaler's
``tilevae.py``) gathers GroupNorm statistics across tiles, but carries each tile through the whole down path with
a 32 px pad, short of the path's receptive field, and its "fast encoder" estimates the statistics on a downscaled
picture. The price here is host memory (a few full-resolution activations) and their copies to and from the device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian, ResnetBlock

TILE_ELEMENTS = 128 * 256 * 256  # one tile: 256 x 256 px of the first level's 128 channels (16 MiB in fp16)


class Parked:
    """A whole activation [B, C, H, W] kept in host memory, written and read tile by tile; with ``groups``,
    the GroupNorm statistics (per image and group) of what was written. On ``meta`` (the VRAM ledger) nothing is
    kept: a tile read is a fresh device tensor of its shape, as a real copy to the device is."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, groups: int = 0,
                 data: torch.Tensor | None = None):
        self.shape, self.dtype, self.device, self.groups = tuple(shape), dtype, device, groups
        if data is None and device.type != "meta":
            data = torch.empty(self.shape, dtype=dtype)
        self.data = data
        self.count = 0
        self.mean = self.m2 = None

    def read(self, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        if self.data is None:
            return torch.empty((*self.shape[:2], bottom - top, right - left), dtype=self.dtype, device=self.device)
        return self.data[:, :, top:bottom, left:right].to(device=self.device, dtype=self.dtype)

    def write(self, top: int, left: int, tile: torch.Tensor) -> None:
        if self.groups:
            self._gather(tile)
        if self.data is not None:
            self.data[:, :, top : top + tile.shape[2], left : left + tile.shape[3]].copy_(tile)

    def _gather(self, tile: torch.Tensor) -> None:
        """Merge the tile's per-group mean and variance into the running ones (Chan et al.'s pairwise update)."""
        var, mean = torch.var_mean(tile.float().reshape(tile.shape[0], self.groups, -1), dim=2, correction=0)
        count = tile[0, : tile.shape[1] // self.groups].numel()
        mean, m2 = mean.double(), var.double() * count
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def normalized(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """``norm(x)`` for a tile ``x`` of this activation, with the whole activation's statistics."""
        if norm.num_groups != self.groups or self.mean is None:
            raise ValueError("no statistics for this GroupNorm")
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps)
        per_channel = x.shape[1] // self.groups
        scale = (rstd.repeat_interleave(per_channel, dim=1) * norm.weight.double()).float()
        shift = norm.bias.float() - self.mean.repeat_interleave(per_channel, dim=1).float() * scale
        return torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None]).to(x.dtype)


def _crop(start: int, stop: int, size: int, stride: int) -> tuple[int, int, int]:
    """Input rows (or columns) ``[begin, end)`` an output span ``[start, stop)`` needs, and where the span starts in
    the crop's output: a 3x3 convolution with padding 1 (stride 1) needs one more on each side; the downsampling
    (stride 2, zero-padded on the bottom and right only, as CompVis trained it) rows ``2 * start`` to ``2 * stop``."""
    if stride == 1:
        begin = max(start - 1, 0)
        return begin, min(stop + 1, size), start - begin
    return 2 * start, min(2 * stop + 1, size), 0


def _segment(op: Callable[..., torch.Tensor], sources: list[Parked], channels: int, stride: int,
             groups: int) -> Parked:
    """``op`` over halo'd tiles of ``sources`` (same height and width), its output parked with its statistics."""
    batch, _, height, width = sources[0].shape
    out_h, out_w = (height, width) if stride == 1 else (height // 2, width // 2)
    out = Parked((batch, channels, out_h, out_w), sources[0].dtype, sources[0].device, groups)
    widest = max([channels] + [source.shape[1] for source in sources])
    side = max(8, math.isqrt(TILE_ELEMENTS // widest))
    for top in range(0, out_h, side):
        bottom = min(top + side, out_h)
        y0, y1, dy = _crop(top, bottom, height, stride)
        for left in range(0, out_w, side):
            right = min(left + side, out_w)
            x0, x1, dx = _crop(left, right, width, stride)
            result = op(*(source.read(y0, y1, x0, x1) for source in sources))
            out.write(top, left, result[:, :, dy : dy + bottom - top, dx : dx + right - left])
            del result
    return out


def _block(block: ResnetBlock, x: Parked, groups: int) -> Parked:
    """``ResnetBlock.forward`` in two segments: each GroupNorm's statistics are its whole input's."""
    def first(tile):
        return block.conv1(F.silu(x.normalized(block.norm1, tile), inplace=True))

    h = _segment(first, [x], block.conv1.out_channels, 1, groups)

    def second(h_tile, x_tile):
        out = block.conv2(block.dropout(F.silu(h.normalized(block.norm2, h_tile), inplace=True)))
        shortcut = block.nin_shortcut(x_tile) if hasattr(block, "nin_shortcut") else x_tile
        return shortcut + out

    return _segment(second, [h, x], block.conv2.out_channels, 1, groups)


def tileable(vae: AutoencoderKL) -> bool:
    """Whether the encoder's down path is only convolutions and GroupNorms (no attention), which tiles exactly."""
    return not any(len(level.attn) for level in vae.encoder.down)


def encode_tiled(vae: AutoencoderKL, pixels: torch.Tensor, device: torch.device) -> DiagonalGaussian:
    """The posterior of ``pixels`` [B, 3, H, W] in [-1, 1] (on the host) as ``vae.encode`` gives it, computed on
    ``device`` in tiles of about :data:`TILE_ELEMENTS` (activations parked on the host between layers)."""
    encoder, dtype = vae.encoder, vae.dtype
    groups = encoder.norm_out.num_groups
    x = Parked(pixels.shape, dtype, device, data=pixels)
    x = _segment(encoder.conv_in, [x], encoder.conv_in.out_channels, 1, groups)
    for level in encoder.down:
        for block in level.block:
            x = _block(block, x, groups)
        if hasattr(level, "downsample"):
            x = _segment(level.downsample, [x], level.downsample.conv.out_channels, 2, groups)
    h = encoder.mid(x.read(0, x.shape[2], 0, x.shape[3]))
    del x
    return DiagonalGaussian(vae.quant_conv(encoder.conv_out(F.silu(encoder.norm_out(h)))))


def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  tiled: bool) -> DiagonalGaussian:
    """``pixels`` (host) through the encoder: whole on ``device``, or with ``tiled`` (the run's decode tiles:
    ``--vae_tiling``, large pictures, low mode's ledger rule) by :func:`encode_tiled`, which holds about one tile's
    activations on the device, where the encoder's down path allows (:func:`tileable`)."""
    with torch.no_grad():
        if tiled and tileable(vae):
            return encode_tiled(vae, pixels.to(dtype), device)
        return vae.encode(pixels.to(device=device, dtype=dtype))
