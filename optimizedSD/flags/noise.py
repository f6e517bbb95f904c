"""The webui's noise settings as flags: ``--rng``, ``--eta``, ``--ensd``, ``--subseed``, ``--subseed_strength``,
``--seed_resize_from`` (what they do: :mod:`ldm.samplers.noise`; docs/cli.md)."""

from __future__ import annotations

import argparse
import random
from typing import Callable

from ldm.errors import UsageError
from ldm.samplers import SAMPLERS
from ldm.samplers.noise import RNG_MODES

SUBSEED_MAX = 2**32 - 1  # the webui draws a random variation seed from [0, 2**32)


def add_noise_flags(add: Callable[..., object]) -> None:
    """The flags, added with the parser's ``add_argument``."""
    add("--rng", choices=RNG_MODES, default="cpu",
        help="cpu: a CPU generator per image (the webui's RNG: CPU); gpu: CUDA's torch.randn computed on any "
             "device (the webui's default GPU noise on an NVIDIA card)")
    add("--eta", type=float, default=1.0,
        help="noise amount of the ancestral and SDE samplers (euler_a, dpm2_a, dpmpp_*sde; the webui's Eta); 0: none")
    add("--ensd", type=int, default=0, metavar="N",
        help="eta noise seed delta (the webui's ENSD): the draws after the start noise come from seed + N")
    add("--subseed", type=int, default=None, metavar="N",
        help="variation seed of the first image, image k uses N + k (random when absent)")
    add("--subseed_strength", type=float, default=0.0, metavar="S",
        help="how much of the variation seed's noise, 0 to 1 (the webui's slerp); every image then shares --seed")
    add("--seed_resize_from", type=str, default=None, metavar="WxH",
        help="draw the seed's noise at this size and paste it centred: a seed's picture at another size")


def check_noise_args(opt: argparse.Namespace) -> None:
    """Numbers in range; ``--eta`` only where a sampler takes it."""
    if not 0 <= opt.eta <= 1:
        raise UsageError(f"--eta must be between 0 and 1, got {opt.eta}")
    if opt.eta != 1 and "eta" not in dict(SAMPLERS[opt.sampler].options):
        raise UsageError(f"--eta applies only to the ancestral and SDE samplers, not {opt.sampler} (DDIM: --ddim_eta)")
    if not 0 <= opt.ensd < 2**32:
        raise UsageError(f"--ensd must be between 0 and 2**32 - 1, got {opt.ensd}")
    if not 0 <= opt.subseed_strength <= 1:
        raise UsageError(f"--subseed_strength must be between 0 and 1, got {opt.subseed_strength}")
    if opt.subseed is not None and not 0 <= opt.subseed < 2**63:
        raise UsageError(f"--subseed must be between 0 and 2**63 - 1, got {opt.subseed}")
    if opt.seed_resize_from is not None:
        parse_size(opt.seed_resize_from)


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` in pixels, each 8 to 8192 (the latent is an eighth of it)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise UsageError(f"--seed_resize_from must be WIDTHxHEIGHT in pixels, like 512x768, got {text!r}")
    width, height = (int(part) for part in parts)
    if not (8 <= width <= 8192 and 8 <= height <= 8192):
        raise UsageError(f"--seed_resize_from: each side must be 8 to 8192 px, got {text!r}")
    return width, height


def noise_settings(opt: argparse.Namespace) -> dict[str, object]:
    """The :class:`ldm.pipeline.request.GenerationRequest` fields of these flags (a random variation seed when
    a strength is given without one)."""
    subseed = opt.subseed
    if subseed is None:
        subseed = random.randint(0, SUBSEED_MAX) if opt.subseed_strength else 0
    return {
        "rng": opt.rng,
        "eta_ancestral": opt.eta,
        "ensd": opt.ensd,
        "subseed": subseed,
        "subseed_strength": opt.subseed_strength,
        "seed_resize_from": None if opt.seed_resize_from is None else parse_size(opt.seed_resize_from),
    }
