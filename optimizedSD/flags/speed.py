"""Fewer and lighter passes as flags: ``--deepcache``, ``--deepcache_branch`` (:mod:`ldm.memory.deep_cache`) and
``--preview_every``; the step limit of ``--sampler lcm``; their metadata fields (docs/cli.md)."""

from __future__ import annotations

import argparse
from typing import Callable

from ldm.errors import UsageError
from ldm.samplers.grids import LCM_TIMESTEPS

DEEPCACHE_BRANCHES = 12  # SD v1's input blocks: the shallow branch ends after input_blocks.0 to .11


def add_speed_flags(add: Callable[..., object]) -> None:
    """The flags, added with the parser's ``add_argument``."""
    add("--deepcache", type=int, default=0, metavar="N",
        help="DeepCache: the whole UNet every N sampler steps, only its shallow branch in between, reusing the "
             "deep features (3 about halves the time per step); 0: off")
    add("--deepcache_branch", type=int, default=0, metavar="B",
        help="DeepCache's shallow branch: input_blocks.0 to B and the matching output blocks (0 to 11; 0 is the "
             "fastest, higher is closer to the plain image)")
    add("--preview_every", type=int, default=0, metavar="N",
        help="write the running image every N steps to OUTDIR/previews/ (TAESD when --vae is one, else the "
             "weight-free approximation); 0: never")


def check_speed_args(opt: argparse.Namespace) -> None:
    """Numbers in range; LCM's step limit."""
    if opt.deepcache < 0:
        raise UsageError(f"--deepcache must be 0 (off) or a number of steps, got {opt.deepcache}")
    if not 0 <= opt.deepcache_branch < DEEPCACHE_BRANCHES:
        raise UsageError(f"--deepcache_branch must be between 0 and {DEEPCACHE_BRANCHES - 1}, got {opt.deepcache_branch}")
    if opt.deepcache_branch and not opt.deepcache:
        raise UsageError("--deepcache_branch goes with --deepcache N")
    if opt.preview_every < 0:
        raise UsageError(f"--preview_every must be 0 (never) or a number of steps, got {opt.preview_every}")
    if opt.sampler == "lcm" and not 1 <= opt.ddim_steps <= LCM_TIMESTEPS.original_steps:
        raise UsageError(f"--sampler lcm takes 1 to {LCM_TIMESTEPS.original_steps} steps, got {opt.ddim_steps}")


def speed_settings(opt: argparse.Namespace) -> dict[str, object]:
    """The :class:`ldm.pipeline.request.GenerationRequest` fields of these flags."""
    return {"deepcache": opt.deepcache, "deepcache_branch": opt.deepcache_branch, "preview_every": opt.preview_every}


def speed_fields(request) -> dict[str, object | None]:
    """Metadata: ``DeepCache: N`` and, when not 0, ``DeepCache branch: B`` (``--from_png`` reads both back)."""
    return {"DeepCache": request.deepcache or None,
            "DeepCache branch": request.deepcache_branch if request.deepcache and request.deepcache_branch else None}
