"""SD v1's KL autoencoder (CompVis ``ldm/models/autoencoder.py`` and ``diffusionmodules/model.py``;
Rombach et al. 2022, Sec. 3.1, after Esser et al. 2021's VQGAN encoder/decoder).

Attribute paths mirror CompVis: ``decoder.up`` is indexed by resolution level (``up.3`` runs first), the
attention blocks use 1x1 convolutions (``decoder.mid.attn_1.q.weight`` is [C, C, 1, 1]).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import attention
from ldm.config import VAEConfig
from ldm.models.unet import PartHook, Upsample, call_part  # the same layers as the UNet's


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU on the norm's fresh output: the same numbers, one full-size tensor fewer at a time.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head of width C. On a GPU (and on meta, which stands for one)
        # made contiguous, so that the last dimension has stride 1: CUDA's fused kernels need it, and without
        # them the whole (H*W)^2 score matrix is built. The CPU's kernel takes the strides as they are, and a
        # copy there would only move the last bit of some results (and the pinned pixels of the tests).
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        if h.device.type != "cpu":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = attention(q, k, v)[:, 0]
        h = h.transpose(1, 2).reshape(batch, channels, height, width).contiguous()  # NCHW for the conv
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as CompVis trained it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution (CompVis' ``mid``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for index, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[index](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        resolution = cfg.resolution
        in_mult = (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(cfg.ch_mult) - 1:
                down.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(down)
        self.mid = MidBlock(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            block_out = cfg.ch * cfg.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                resolution *= 2
            self.up.insert(0, up)  # indexed by resolution level: up[-1] runs first
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def parts(self) -> list[tuple[str, nn.Module]]:
        """The parts :meth:`forward` hands to its hook, in the order it runs them (CompVis attribute paths)."""
        parts: list[tuple[str, nn.Module]] = [("conv_in", self.conv_in), ("mid", self.mid)]
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                parts.append((f"up.{i}.block.{j}", block))
                if len(level.attn):
                    parts.append((f"up.{i}.attn.{j}", level.attn[j]))
            if hasattr(level, "upsample"):
                parts.append((f"up.{i}.upsample", level.upsample))
        return parts + [("norm_out", self.norm_out), ("conv_out", self.conv_out)]

    def forward(self, z: torch.Tensor, hook: PartHook = call_part) -> torch.Tensor:
        # Block by block, ``h`` rebound after each: a level's input (the full-resolution 256-channel tensor
        # from the upsampling before the last level) is freed once its first block has read it.
        h = z
        for name, module in self.parts():
            h = hook(name, module, h)
            if name == "norm_out":
                h = F.silu(h, inplace=True)
        return h


class DiagonalGaussian:
    """The encoder's posterior N(mean, std^2); log-variance clamped to [-30, 20] as in CompVis."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise.to(self.mean)


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] <-> unscaled latents (multiply by the model's scale factor for the UNet)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(x))

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the posterior's mean and log-variance, stacked on the channels."""
        return self.quant_conv(self.encoder(x.to(self.dtype)))

    def decode(self, z: torch.Tensor, hook: PartHook = call_part) -> torch.Tensor:
        """Unscaled latents -> images; ``hook`` runs each of the decoder's parts (see :meth:`decoder_parts`)."""
        z = hook("post_quant_conv", self.post_quant_conv, z.to(self.dtype))
        return self.decoder(z, lambda name, module, *args: hook("decoder." + name, module, *args))

    def decoder_parts(self) -> list[tuple[str, nn.Module]]:
        """What :meth:`decode` runs, in order, under the names it gives its hook."""
        return [("post_quant_conv", self.post_quant_conv)] + [("decoder." + n, m) for n, m in self.decoder.parts()]

    def fp32_copy(self, device: torch.device) -> "AutoencoderKL":
        """A float32 copy of the whole model on ``device`` (the fp16 overflow retry)."""
        return copy.deepcopy(self).to(device=device, dtype=torch.float32)
