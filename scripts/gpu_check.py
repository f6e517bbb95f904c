#!/usr/bin/env python3
"""The VRAM ledger next to a real GPU: each memory mode's ``max_memory_allocated`` and time, measured.

    python scripts/gpu_check.py --sizes 512 768 1024 --json gpu-ledger.json

For each size and mode, the same calls (``ldm.ledger.calls.generation_calls``, the generation stages themselves: the prompts, one
batch of sampling, each image's decode) run twice: on the ``meta`` device under the ledger (the
prediction), and on CUDA with SD v1 weights drawn at random in fp16 (the measurement: the peak of
``torch.cuda.memory_allocated`` above what was allocated before, per phase and overall, and the wall
time). The difference is the ledger's constant overhead on that card (cuBLAS/cuDNN workspaces, the
allocator's 512-byte rounding) and is printed for calibration. ``scripts/gpu_check.sh`` runs this, the
end-to-end benchmark against diffusers and the CUDA tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 2**30
MODES = ("full", "medium", "low")


def random_sd_v1(config: str, dtype):
    """SD v1's models with random weights on the CPU (the values change neither memory nor time): small
    normal matrices, unit norm scales, zero biases, so that the fp16 decode does not overflow (which would
    run the fp32 retry, a different path)."""
    import torch

    from ldm.ledger import meta_stable_diffusion

    sd = meta_stable_diffusion(config, dtype)
    generator = torch.Generator().manual_seed(0)
    for model in (sd.text_encoder, sd.unet, sd.vae):
        model.to_empty(device="cpu")
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():  # CLIP's position ids
                tensor.copy_(torch.arange(tensor.shape[-1]).expand(tensor.shape))
            elif tensor.dim() > 1:
                tensor.normal_(0.0, 0.02, generator=generator)
            else:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)  # norms' scales; biases
    return sd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpm_solver")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    from ldm.ledger import RunShape, meta_stable_diffusion, simulate
    from ldm.ledger.measured import measure_on_cuda
    from ldm.ledger.plan import low_mode_tiles, plan_steps

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, fp16, batch 1, guidance 7.5, "
          f"{args.steps} {args.sampler} steps, sdpa")
    meta_sd = meta_stable_diffusion(args.config, torch.float16)
    sd = random_sd_v1(args.config, torch.float16)
    header = f"{'size':>5} {'mode':<7}{'ledger GiB':>11}{'measured GiB':>13}{'diff MiB':>9}{'UNet l/m':>16}{'VAE l/m':>16}{'time s':>8}"
    print(header)
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            shape = RunShape(size, size, sampler=args.sampler, steps=args.steps)
            if mode == "low":
                shape = replace(shape, tiled=low_mode_tiles(args.config, shape))
            predicted = simulate(meta_sd, mode, replace(shape, steps=plan_steps(args.sampler, args.steps)))
            measured = measure_on_cuda(sd, mode, shape, device)
            row = {"size": size, "mode": mode, "tiled": shape.tiled, "ledger": predicted.as_json(), "measured": measured}
            rows.append(row)
            lp, mp = predicted.phase_peaks, measured["phase_peaks"]
            print(f"{size:>5} {mode:<7}{predicted.peak_bytes / GIB:>11.3f}{measured['peak_bytes'] / GIB:>13.3f}"
                  f"{(measured['peak_bytes'] - predicted.peak_bytes) / 2**20:>9.1f}"
                  f"{lp['unet'].total / GIB:>8.3f}/{mp.get('unet', 0) / GIB:.3f}"
                  f"{lp['vae'].total / GIB:>8.3f}/{mp.get('vae', 0) / GIB:.3f}{measured['seconds']:>8.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
