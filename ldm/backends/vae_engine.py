"""The KL autoencoder's halves as OpenVINO models on the CPU (``--backend openvino``): the decoder, unscaled
latents -> images in [-1, 1] (:meth:`ldm.models.autoencoder.AutoencoderKL.decode`), and the encoder, images ->
the posterior's mean and log-variance (:meth:`~ldm.models.autoencoder.AutoencoderKL.moments`; the posterior is
sampled in PyTorch with the image's generator, as without the backend), each with the numbers of PyTorch's
within fp32 rounding.

Measured (``scripts/openvino_vae_timing.py``; docs/benchmarks.md), SD v1 at 512x512, fp32, 2 threads: the decoder
PyTorch 14.7 s, OpenVINO 12.0 s (0.82x; 0.88x with its buffers given back after each call, as now); the encoder
PyTorch 7.0 s, OpenVINO 5.4 s (0.78x either way); each converted and stored in about 2 s and compiled for a
shape in 0.2-0.9 s. So each is converted only into a cache (``--backend_cache``; converting on
every run would cost more than it saves), and the decoder's shape compiles ahead while the UNet samples. Tiled
decodes and encodes (``--vae_tiling``, large images) stay in PyTorch, whose VAE weights stay too; TAESD stays in
PyTorch (its decode is 1 s).

The key is the half's weights as loaded (:func:`ldm.checkpoints.hashes.sampled_fingerprint`: a file's
fingerprint misses a baked-in VAE), the VAE config, the dtype and the OpenVINO version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class VAEHalf:
    """What one OpenVINO model of the VAE runs: ``method`` of :class:`AutoencoderKL`, which runs ``modules`` (the
    weights its cache key hashes), on an input of ``input_channels`` (a :class:`VAEConfig` field) channels."""

    name: str
    method: str
    modules: tuple[str, ...]
    input_channels: str


DECODER = VAEHalf("VAE decoder", "decode", ("post_quant_conv", "decoder"), "embed_dim")
ENCODER = VAEHalf("VAE encoder", "moments", ("encoder", "quant_conv"), "in_channels")


class OpenVinoVAEHalf(ShapeCompiler):
    """A converted half (dynamic batch and size) compiled for the CPU per input shape: a tensor in, one out (a
    copy: the call's buffers are given back after it, as a half runs once per image and would otherwise hold
    them through the UNet's sampling)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().contiguous().numpy()
        with self.in_use():
            return torch.from_numpy(self.for_shapes((tuple(array.shape),))([array], share_inputs=True)[0])


class _Traced(nn.Module):
    """What is traced: one method of the VAE."""

    def __init__(self, vae: AutoencoderKL, half: VAEHalf):
        super().__init__()
        self.vae, self.method = vae, half.method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.vae, self.method)(x)


def convert_half(vae: AutoencoderKL, half: VAEHalf):
    """``openvino.convert_model`` of ``half`` with dynamic batch, height and width (traced on a small example)."""
    ov = import_openvino()
    channels = getattr(vae.config, half.input_channels)
    example = (torch.zeros(1, channels, 8, 8, dtype=vae.dtype),)
    start = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(_Traced(vae, half).eval(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, channels, -1, -1])])
    log.info("converted the %s for OpenVINO in %.1f s", half.name, time.perf_counter() - start)
    return model


def half_key(vae: AutoencoderKL, half: VAEHalf, config: VAEConfig, openvino_version: str) -> str:
    weights = {k: v for name in half.modules for k, v in getattr(vae, name).state_dict(prefix=name + ".").items()}
    # "vae decoder": the decoder's key as it was before the encoder joined it, so that cached entries stay valid
    parts = {"format": FORMAT, "model": half.name.lower(), "openvino": openvino_version, "weights": sampled_fingerprint(weights),
             "dtype": str(vae.dtype), "vae": asdict(config)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def openvino_half(vae: AutoencoderKL, half: VAEHalf, key: str, cache: IRCache) -> OpenVinoVAEHalf:
    """``half`` converted, from ``cache``, else converted and stored there (when the cache cannot keep it, the
    conversion is used for this run all the same: it is paid for)."""
    model, weights_file = read_or_convert(cache, key, lambda: convert_half(vae, half))
    return OpenVinoVAEHalf(model, half.name, weights_file)
