"""The KL autoencoder's decoder as an OpenVINO model on the CPU (``--backend openvino``): ``decoder(z) -> images``
with :meth:`ldm.models.autoencoder.AutoencoderKL.decode`'s convention (unscaled latents in, images in [-1, 1]
out), the numbers of the PyTorch decoder within fp32 rounding.

Measured before it was wired in (docs/benchmarks.md): SD v1's decoder at 512x512, fp32, 2 threads, PyTorch
15.1 s, OpenVINO 12.5 s; converting it takes 2 s and compiling a shape 0.4 s. So it is converted only into a
cache (``--backend_cache``; converting on every run would cost more than it saves) and the run's shape compiles
ahead while the UNet samples. Tiled decodes (``--vae_tiling``, large images) stay in PyTorch, whose decoder
weights stay too; TAESD stays in PyTorch (its decode is 1 s).

The key is the decoder's weights as loaded (:func:`ldm.checkpoints.hashes.sampled_fingerprint`: a file's
fingerprint misses a baked-in VAE), the VAE config, the dtype and the OpenVINO version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ldm.backends.ir_cache import FORMAT, IRCache
from ldm.backends.openvino_runtime import import_openvino, read_or_convert
from ldm.backends.shape_compiler import ShapeCompiler
from ldm.checkpoints.hashes import sampled_fingerprint
from ldm.config import VAEConfig
from ldm.models.autoencoder import AutoencoderKL

log = logging.getLogger(__name__)


class OpenVinoDecoder(ShapeCompiler):
    """A converted decoder (dynamic batch and size) compiled for the CPU per latent shape."""

    def __init__(self, model, weights_file: Path | None = None) -> None:
        super().__init__(model, "VAE decoder", weights_file)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        latents = z.detach().float().contiguous().numpy()
        images = self.for_shapes((tuple(latents.shape),))([latents], share_inputs=True)[0]
        return torch.from_numpy(images)


class _Decode(nn.Module):
    """What is traced: :meth:`AutoencoderKL.decode` (``post_quant_conv``, then the decoder)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def convert_decoder(vae: AutoencoderKL):
    """``openvino.convert_model`` of the decoder with dynamic batch, height and width (traced on a small example)."""
    ov = import_openvino()
    channels = vae.config.embed_dim
    example = (torch.zeros(1, channels, 8, 8, dtype=vae.dtype),)
    start = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(_Decode(vae).eval(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, channels, -1, -1])])
    log.info("converted the VAE decoder for OpenVINO in %.1f s", time.perf_counter() - start)
    return model


def decoder_key(vae: AutoencoderKL, config: VAEConfig, openvino_version: str) -> str:
    parts = {"format": FORMAT, "model": "vae decoder", "openvino": openvino_version,
             "weights": sampled_fingerprint({**vae.post_quant_conv.state_dict(prefix="post_quant_conv."),
                                             **vae.decoder.state_dict(prefix="decoder.")}), "dtype": str(vae.dtype), "vae": asdict(config)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def openvino_decoder(vae: AutoencoderKL, key: str, cache: IRCache) -> OpenVinoDecoder:
    """The converted decoder from ``cache``, else converted and stored there (when the cache cannot keep it, the
    conversion is used for this run all the same: it is paid for)."""
    return OpenVinoDecoder(*read_or_convert(cache, key, lambda: convert_decoder(vae)))
