#!/usr/bin/env python3
"""int8 variants of ``--quantize``: one UNet forward's error against fp32, and the weight bytes.

    python scripts/quantize_error.py                                   # full SD v1 shapes, 32x32 latents
    python scripts/quantize_error.py --config configs/tiny-random.yaml --size 16

Random weights as ``ldm.loading.random_weights.random_state_dict`` makes them (the module's default initialisation
plus 0.02 Gaussian noise; only the UNet is built), batch 2 (as guidance runs it), t = 1 and 600. For each
group size (``row``: one scale per output channel) the UNet is quantized by ``ldm.models.quantize.quantize_unet``
and the relative L2 error of its output is printed, with the weights' own rms error and the weight bytes as
a GPU holds them in fp16 (int8 one byte, every float two).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.config import load_model_config  # noqa: E402
from ldm.models.quantize import KEEP_FLOAT, quantize_unet  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402


def fp16_bytes(module: nn.Module) -> int:
    return sum(t.numel() * (1 if t.dtype == torch.int8 else 2) for t in [*module.parameters(), *module.buffers()])


def weight_error(exact: nn.Module, quantized: nn.Module) -> float:
    """rms error of the quantized layers' weights, relative to their rms."""
    error = total = 0.0
    for name, layer in exact.named_modules():
        if name in KEEP_FLOAT or type(layer) not in (nn.Linear, nn.Conv2d):
            continue
        approx = quantized.get_submodule(name).dequantized_weight().float()
        error += (approx - layer.weight).pow(2).sum().item()
        total += layer.weight.pow(2).sum().item()
    return (error / total) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--groups", default="row,128,64,32", help="group sizes, comma-separated; row: one per channel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_model_config(args.config)
    torch.manual_seed(args.seed)
    unet = UNetModel(cfg.unet).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        x = torch.randn(2, cfg.unet.in_channels, args.size, args.size, generator=generator)
        t, context = torch.tensor([1.0, 600.0]), torch.randn(2, 77, cfg.unet.context_dim, generator=generator)
        exact, fp16 = unet(x, t, context), fp16_bytes(unet)
        for group in args.groups.split(","):
            quantized = copy.deepcopy(unet)
            started = time.process_time()
            quantize_unet(quantized, group_size=None if group == "row" else int(group))
            seconds = time.process_time() - started
            error = ((quantized(x, t, context) - exact).norm() / exact.norm()).item()
            print(f"group {group:>4}: forward {100 * error:.2f} % from fp32, weights {100 * weight_error(unet, quantized):.3f} % "
                  f"rms, {fp16_bytes(quantized) / fp16:.4f}x fp16 bytes, quantized in {seconds:.1f} CPU-s", flush=True)
            del quantized
    return 0


if __name__ == "__main__":
    sys.exit(main())
