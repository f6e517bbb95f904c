"""SD v1's denoising UNet (CompVis ``openaimodel.UNetModel``; Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", built on Dhariwal & Nichol 2021's ADM UNet).

Only the text-conditioned inference path is kept. Attribute paths and Sequential indices mirror CompVis
exactly, placeholder slots included, so ``model.diffusion_model.*`` keys load without renaming.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import SpatialTransformer
from ldm.config import UNetConfig


PartHook = Callable[..., torch.Tensor]
"""``hook(name, module, *args) -> module(*args)``: how a model's forward runs each of its named parts. The
default, :func:`call_part`, just calls it; the low-VRAM streamer (:mod:`ldm.memory.residency`) puts the part's
weights on the device first. One forward, whoever drives it."""


def call_part(name: str, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return module(*args)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first as in CompVis."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (CompVis' ``normalization``): fp16 overflows here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, and a skip (1x1 conv if widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),  # CompVis' slot: out_layers.3 is the conv
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the text context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def transformer(config: UNetConfig, ch: int) -> SpatialTransformer:
    """The cross-attention block of a level ``ch`` channels wide."""
    heads, head_dim = config.attention_shape(ch)
    return SpatialTransformer(ch, heads, head_dim, config.transformer_depth, config.context_dim)


def encoder_blocks(config: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """``input_blocks`` (the UNet's encoder, also the ControlNet's copy of it) and each block's output width,
    the skips' channels."""
    mc, time_dim = config.model_channels, config.model_channels * 4
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
    skip_channels = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, time_dim, mult * mc)]
            ch = mult * mc
            if ds in config.attention_resolutions:
                layers.append(transformer(config, ch))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(config.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    return blocks, skip_channels


def middle_block(config: UNetConfig, ch: int) -> TimestepEmbedSequential:
    """``middle_block``: ResBlock, cross-attention, ResBlock at the deepest width ``ch``."""
    time_dim = config.model_channels * 4
    return TimestepEmbedSequential(ResBlock(ch, time_dim, ch), transformer(config, ch), ResBlock(ch, time_dim, ch))


class UNetModel(nn.Module):
    """eps-prediction UNet: ``forward(x, timesteps, context) -> eps`` (same shape as ``x``)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        self.model_channels = mc
        time_dim = mc * 4
        # time_embed.1 is the SiLU slot.
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

        self.input_blocks, skip_channels = encoder_blocks(config)
        ch, ds = skip_channels[-1], 2 ** (len(config.channel_mult) - 1)
        self.middle_block = middle_block(config, ch)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_dim, mc * mult)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(transformer(config, ch))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def parts(self) -> list[tuple[str, nn.Module]]:
        """The parts :meth:`forward` hands to its hook, in the order it runs them (CompVis attribute paths)."""
        parts: list[tuple[str, nn.Module]] = [("time_embed", self.time_embed)]
        parts += [(f"input_blocks.{i}", block) for i, block in enumerate(self.input_blocks)]
        parts.append(("middle_block", self.middle_block))
        parts += [(f"output_blocks.{i}", block) for i, block in enumerate(self.output_blocks)]
        parts.append(("out", self.out))
        return parts

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, hook: PartHook = call_part,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """eps for noisy latents ``x`` at ``timesteps`` given the text ``context``; ``hook`` runs each part.
        ``control``: a ControlNet's residuals (:mod:`ldm.control`), one per skip then the middle block's, added
        to the skips and to the middle block's output (cldm's ``ControlledUnetModel``)."""
        dtype = self.out[2].weight.dtype
        emb = hook("time_embed", self.time_embed, timestep_embedding(timesteps, self.model_channels).to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = hook(f"input_blocks.{i}", block, h, emb, context)
            skips.append(h)
        h = hook("middle_block", self.middle_block, h, emb, context)
        if control is not None:
            skips = [skip + residual.to(dtype) for skip, residual in zip(skips, control[:-1], strict=True)]
            h = h + control[-1].to(dtype)
        for i, block in enumerate(self.output_blocks):
            h = hook(f"output_blocks.{i}", block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return hook("out", self.out, h).to(x.dtype)
