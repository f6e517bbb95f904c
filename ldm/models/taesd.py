"""TAESD, the tiny autoencoder for SD v1 latents (madebyollin/taesd ``taesd.py``; diffusers' ``AutoencoderTiny``).

2.4M parameters of 3x3 convolutions and ReLUs in place of the 84M-parameter KL autoencoder, distilled to give
the same pictures. It works on the latents as the UNet makes them: no posterior to sample and no scale factor
(``AutoencoderTiny.config.scaling_factor`` is 1.0), so a model loaded with it has ``scale_factor`` 1.0.

Layout: diffusers' ``encoder.layers.N`` / ``decoder.layers.N``. The original ``taesd_decoder.pth`` starts its
Sequential with a parameter-free ``Clamp`` that diffusers moved into ``DecoderTiny.forward``, so its layer N is
diffusers' layer N-1 (:func:`ldm.checkpoints.vae_files.tiny_keys_from_original` maps them).

The attribute names ``encoder``, ``decoder``, ``quant_conv`` and ``post_quant_conv`` (the last two identities)
and the methods match :class:`ldm.models.autoencoder.AutoencoderKL`, so residency, streaming and the decode's
out-of-memory ladder take either.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ldm.errors import UserError
from ldm.models.unet import PartHook, call_part

CHANNELS = 64
LATENT_CHANNELS = 4
ENCODER_BLOCKS = (1, 3, 3, 3)  # per level: a (strided after the first) conv, then that many blocks
DECODER_BLOCKS = (3, 3, 3, 1)  # per level: that many blocks, then (upsample, conv) except after the last
LATENT_MAGNITUDE = 3.0  # the decoder's input soft clamp: tanh(z / 3) * 3


@dataclass(frozen=True)
class TinyVAEConfig:
    """What the decode's tiling reads of a VAE config (``downsampling_factor``, ``out_ch``)."""

    downsampling_factor: int = 8
    out_ch: int = 3
    embed_dim: int = LATENT_CHANNELS


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def on_cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last order on the CPU, where oneDNN's 3x3 convolutions with 64 channels run 1.3x as fast
    in it (TAESD's decode at 512x512: 1.31 -> 1.02 s, the same values within fp32 rounding); as it is elsewhere."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class TinyBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)) (TAESD's ``Block``, diffusers' ``AutoencoderTinyBlock``)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """Images in [-1, 1] -> latents (TAESD's ``Encoder`` on images in [0, 1])."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for level, blocks in enumerate(ENCODER_BLOCKS):
            layers.append(conv(3, CHANNELS) if level == 0 else conv(CHANNELS, CHANNELS, stride=2, bias=False))
            layers += [TinyBlock(CHANNELS, CHANNELS) for _ in range(blocks)]
        layers.append(conv(CHANNELS, LATENT_CHANNELS))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(on_cpu_channels_last(x.add(1).div(2))).contiguous()


class TinyDecoder(nn.Module):
    """Latents -> images in [-1, 1] (TAESD's ``Decoder``, whose output is in [0, 1])."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [conv(LATENT_CHANNELS, CHANNELS), nn.ReLU()]
        for level, blocks in enumerate(DECODER_BLOCKS):
            last = level == len(DECODER_BLOCKS) - 1
            layers += [TinyBlock(CHANNELS, CHANNELS) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(conv(CHANNELS, 3 if last else CHANNELS, bias=last))
        self.layers = nn.Sequential(*layers)

    def parts(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    def forward(self, z: torch.Tensor, hook: PartHook = call_part) -> torch.Tensor:
        h = on_cpu_channels_last(torch.tanh(z / LATENT_MAGNITUDE) * LATENT_MAGNITUDE)
        for name, layer in self.parts():
            h = hook(name, layer, h)
        return h.mul(2).sub(1).contiguous()


class TinyLatent:
    """The encoder's answer in the place of a posterior: one latent, nothing to sample."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean


class MissingEncoder(nn.Module):
    """The encoder slot of a TAESD given as ``taesd_decoder.pth`` alone: decoding works, encoding says what is missing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise UserError("this TAESD has no encoder: put taesd_encoder.pth next to taesd_decoder.pth to encode an image")


class TinyAutoencoder(nn.Module):
    """Images in [-1, 1] <-> the UNet's latents, with :class:`~ldm.models.autoencoder.AutoencoderKL`'s interface;
    ``with_encoder=False`` for a decoder alone."""

    def __init__(self, with_encoder: bool = True):
        super().__init__()
        self.config = TinyVAEConfig()
        self.encoder = TinyEncoder() if with_encoder else MissingEncoder()
        self.decoder = TinyDecoder()
        self.quant_conv = nn.Identity()  # no posterior moments: the names residency's groups are made of
        self.post_quant_conv = nn.Identity()

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype

    def encode(self, x: torch.Tensor) -> TinyLatent:
        return TinyLatent(self.encoder(x.to(self.dtype)))

    def decode(self, z: torch.Tensor, hook: PartHook = call_part) -> torch.Tensor:
        """Latents -> images; ``hook`` runs each of the decoder's parts (see :meth:`decoder_parts`)."""
        return self.decoder(z.to(self.dtype), lambda name, module, *args: hook("decoder." + name, module, *args))

    def decoder_parts(self) -> list[tuple[str, nn.Module]]:
        return [("decoder." + name, module) for name, module in self.decoder.parts()]

    def fp32_copy(self, device: torch.device) -> "TinyAutoencoder":
        return copy.deepcopy(self).to(device=device, dtype=torch.float32)
