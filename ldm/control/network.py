"""lllyasviel's ControlNet for SD v1 (``cldm/cldm.py`` ``ControlNet``; Zhang, Rao & Agrawala 2023): a trainable
copy of the UNet's encoder (``input_blocks``, ``middle_block``) fed the latent plus an embedded hint image, whose
every skip goes out through a zero-initialised 1x1 conv (``zero_convs.i``, ``middle_block_out``).

Built from the UNet's own blocks (:mod:`ldm.models.unet`), so the attribute paths are CompVis' and the v1.1
files' keys load without renaming. :meth:`ControlNet.forward` runs its parts through a hook as
:meth:`ldm.models.unet.UNetModel.forward` does, so the memory room can stream it block by block.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.config import UNetConfig
from ldm.models.unet import PartHook, call_part, encoder_blocks, middle_block, timestep_embedding

HINT_CHANNELS = 3  # an RGB hint image in [0, 1]
# The hint encoder's widths (fixed in cldm.py whatever the UNet's width): three stride-2 convs take the image
# down by 8, to the latent's size.
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


def hint_encoder(model_channels: int, hint_channels: int = HINT_CHANNELS) -> nn.Sequential:
    """``input_hint_block``: 3x3 convs with SiLU between (the odd slots), the last conv to the UNet's width."""
    layers: list[nn.Module] = []
    channels = hint_channels
    for width, stride in zip(HINT_WIDTHS, HINT_STRIDES):
        layers += [nn.Conv2d(channels, width, 3, padding=1, stride=stride), nn.SiLU()]
        channels = width
    layers.append(nn.Conv2d(channels, model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> nn.Sequential:
    """``zero_convs.i`` / ``middle_block_out``: a 1x1 conv in slot 0 (keys ``*.0.weight``)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1))


class ControlNet(nn.Module):
    """``forward(x, hint, timesteps, context) -> residuals``: one per UNet skip (``len(input_blocks)``), then the
    middle block's, unweighted. ``config`` is the UNet's (a ControlNet copies the encoder of the UNet it steers)."""

    def __init__(self, config: UNetConfig, hint_channels: int = HINT_CHANNELS):
        super().__init__()
        self.config = config
        mc = config.model_channels
        self.model_channels = mc
        self.in_channels = config.in_channels
        time_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input_hint_block = hint_encoder(mc, hint_channels)

        # The UNet's encoder, block for block, each skip out through its zero conv.
        self.input_blocks, skip_channels = encoder_blocks(config)
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in skip_channels])
        self.middle_block = middle_block(config, skip_channels[-1])
        self.middle_block_out = zero_conv(skip_channels[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block_out[0].weight.dtype

    def parts(self) -> list[tuple[str, nn.Module]]:
        """The parts :meth:`forward` hands to its hook, in the order it runs them."""
        parts: list[tuple[str, nn.Module]] = [("time_embed", self.time_embed), ("input_hint_block", self.input_hint_block)]
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            parts += [(f"input_blocks.{i}", block), (f"zero_convs.{i}", zero)]
        parts += [("middle_block", self.middle_block), ("middle_block_out", self.middle_block_out)]
        return parts

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                hook: PartHook = call_part) -> list[torch.Tensor]:
        """The residuals for noisy latents ``x`` [B, 4, h, w] and ``hint`` [B, 3, 8h, 8w] in [0, 1] (cldm's
        ``ControlNet.forward``: the embedded hint is added after the first conv)."""
        dtype = self.dtype
        emb = hook("time_embed", self.time_embed, timestep_embedding(timesteps, self.model_channels).to(dtype))
        guided = hook("input_hint_block", self.input_hint_block, hint.to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        residuals = []
        for i, block in enumerate(self.input_blocks):
            h = hook(f"input_blocks.{i}", block, h, emb, context)
            if i == 0:
                h = h + guided
            residuals.append(hook(f"zero_convs.{i}", self.zero_convs[i], h))
        h = hook("middle_block", self.middle_block, h, emb, context)
        residuals.append(hook("middle_block_out", self.middle_block_out, h))
        return residuals
