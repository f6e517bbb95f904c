"""``--backend openvino`` for the UNet of a loaded checkpoint: the cache key of its weights, the converted model
from the disk cache or a fresh conversion (stored for the next run), then the PyTorch weights given back.

The key is the sha256 of what decides the converted model's numbers: the checkpoint's UNet tensors (sampled:
:func:`~ldm.checkpoints.hashes.sampled_fingerprint`), ``--use_ema``, each merged LoRA's (its tensors, sampled) and weight in order,
``--quantize``, the weights' dtype, the UNet's config, and the OpenVINO version. ``--vae`` is not in it: it does
not change the UNet. Shapes are not either: the model is converted with dynamic shapes
(:mod:`ldm.backends.openvino_unet`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ldm.backends.ir_cache import FORMAT, IRCache
from ldm.backends.openvino_runtime import import_openvino, read_or_convert
from ldm.backends.openvino_unet import OpenVinoUNet, convert_unet, release_weights
from ldm.checkpoints.hashes import sampled_fingerprint
from ldm.checkpoints.reader import read_checkpoint
from ldm.config import UNetConfig

log = logging.getLogger(__name__)

Progress = Callable[[str], object]


def unet_key(weights: str, config: UNetConfig, *, use_ema: bool, loras: Sequence[tuple[Path, float]],
             quantize: str | None, dtype: torch.dtype, openvino_version: str) -> str:
    """The cache key of the converted UNet (see the module's docstring for what goes in); ``weights``: the
    :func:`~ldm.checkpoints.hashes.sampled_fingerprint` of the checkpoint's UNet tensors."""
    parts = {
        "format": FORMAT, "openvino": openvino_version, "unet weights": weights,
        "use_ema": use_ema, "loras": [[sampled_fingerprint(read_checkpoint(path)), float(weight)] for path, weight in loras],
        "quantize": quantize, "dtype": str(dtype), "unet": asdict(config),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_unet(config: UNetConfig, key: str, cache: IRCache) -> OpenVinoUNet | None:
    """The converted UNet ``key`` from ``cache``, ready to compile; None when the cache does not hold it."""
    model = cache.load(key, import_openvino().Core().read_model)
    return None if model is None else OpenVinoUNet(model, config.in_channels, cache.path(key) / "model.bin")


def openvino_unet(unet: nn.Module, config: UNetConfig, key: str, cache: IRCache,
                  progress: Progress | None = None) -> OpenVinoUNet:
    """The converted ``unet`` (from ``cache`` when it holds ``key``, else converted and stored there); the
    PyTorch weights are given back once the model comes from disk, where OpenVINO maps them from the file."""
    model, weights_file = read_or_convert(
        cache, key, lambda: convert_unet(unet, config.in_channels, config.context_dim, progress))
    engine = OpenVinoUNet(model, config.in_channels, weights_file)
    if weights_file is None:  # no cache: the converted model shares the PyTorch weights, which stay
        return engine
    freed = release_weights(unet)
    log.info("OpenVINO UNet from %s; %.2f GiB of PyTorch weights given back", cache.path(key), freed / 2**30)
    return engine
