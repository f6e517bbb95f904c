"""``--tome``: token merging switched on in the UNet's full-resolution transformer blocks (the merging itself,
tomesd's bipartite soft matching, is :mod:`ldm.models.token_matching`)."""

from __future__ import annotations

import logging

from torch import nn

from ldm.models.attention import SpatialTransformer
from ldm.models.token_matching import TokenMerging
from ldm.models.unet import Downsample, Upsample

log = logging.getLogger(__name__)


def transformer_blocks_by_downsample(unet: nn.Module) -> list[tuple[int, nn.Module]]:
    """Every ``BasicTransformerBlock`` of the UNet with how many times its input was downsampled (1, 2, 4, 8),
    found by walking the blocks in execution order and counting ``Downsample``/``Upsample`` layers."""
    found, factor = [], 1
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found += [(factor, transformer_block) for transformer_block in layer.transformer_blocks]
            elif isinstance(layer, Downsample):
                factor *= 2
            elif isinstance(layer, Upsample):
                factor //= 2
    return found


def apply_token_merging(unet: nn.Module, settings: TokenMerging | float | None) -> int:
    """Set (or, with None or ratio 0, clear) token merging on the UNet's transformer blocks; returns how
    many blocks merge. Blocks downsampled more than ``settings.max_downsample`` times are left alone."""
    if isinstance(settings, (int, float)):
        settings = TokenMerging(float(settings))
    if settings is not None and settings.ratio == 0:
        settings = None
    count = 0
    for factor, block in transformer_blocks_by_downsample(unet):
        merges = settings is not None and factor <= settings.max_downsample
        block.token_merging = settings if merges else None
        count += merges
    if settings is not None:
        log.info("token merging: ratio %.2f in %d transformer blocks", settings.ratio, count)
    return count
