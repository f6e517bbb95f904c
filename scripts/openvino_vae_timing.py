#!/usr/bin/env python3
"""The KL VAE's halves through ``--backend openvino``'s engine against PyTorch: seconds per call and the largest
difference, the figures ``ldm/backends/vae_engine.py`` was wired in on.

    python scripts/openvino_vae_timing.py                      # SD v1's VAE, 512x512, 2 threads
    python scripts/openvino_vae_timing.py --size 256 --repeat 5

Random weights (the module's default initialisation: the timing does not depend on them), fp32, batch 1. Each
half is converted once into a temporary cache (the conversion time is printed), compiled for the size (its
compile time too), then called ``--repeat`` times after one warm-up call, as is PyTorch's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.backends.ir_cache import IRCache  # noqa: E402
from ldm.backends.openvino_runtime import openvino_version  # noqa: E402
from ldm.backends.vae_engine import DECODER, ENCODER, openvino_half  # noqa: E402
from ldm.config import load_model_config  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402


def seconds(call, x: torch.Tensor, repeat: int) -> tuple[list[float], torch.Tensor]:
    with torch.no_grad():
        out = call(x)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = call(x)
            times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_model_config(args.config)
    torch.manual_seed(0)
    vae = AutoencoderKL(config.vae).eval()
    factor = config.downsampling_factor
    inputs = {DECODER: torch.randn(1, config.vae.embed_dim, args.size // factor, args.size // factor),
              ENCODER: torch.rand(1, config.vae.in_channels, args.size, args.size) * 2 - 1}
    print(f"# {args.size}x{args.size}, fp32, {args.threads} threads, torch {torch.__version__}, "
          f"OpenVINO {openvino_version()}")
    with tempfile.TemporaryDirectory() as folder:
        cache = IRCache(Path(folder), openvino_version())
        for half, x in inputs.items():
            eager, expected = seconds(getattr(vae, half.method), x, args.repeat)
            start = time.perf_counter()
            engine = openvino_half(vae, half, half.method, cache)
            converted = time.perf_counter() - start
            start = time.perf_counter()
            engine.for_shapes((tuple(x.shape),))
            compiled = time.perf_counter() - start
            ov, got = seconds(engine, x, args.repeat)
            difference = (got - expected).abs().max().item()
            print(f"{half.name}: PyTorch {' '.join(f'{t:.2f}' for t in eager)} s, OpenVINO "
                  f"{' '.join(f'{t:.2f}' for t in ov)} s ({min(ov) / min(eager):.2f}x best against best); "
                  f"converting {converted:.1f} s, compiling {compiled:.1f} s; largest difference {difference:.1e} "
                  f"(values up to {expected.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
