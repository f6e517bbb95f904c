"""Inpainting's "Inpaint area" and "Masked content" as flags (what they do: :mod:`ldm.passes.only_masked`;
docs/cli.md): ``--inpaint_area``, ``--only_masked_padding``, ``--masked_content``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ldm.errors import UsageError
from ldm.passes.only_masked import AREAS, CONTENTS
from ldm.pipeline.request import MaskOptions

INPAINT_AREA_DESTS = ("inpaint_area", "only_masked_padding", "masked_content")  # --from_png sets them
ONLY_MASKED_SIZE = 512  # px: the crop's size when --H/--W are not given (the webui's default width and height)


def add_inpaint_area_flags(add: Callable[..., object]) -> None:
    """The flags, added with the parser's ``add_argument`` (optimized_inpaint.py only)."""
    add("--inpaint_area", choices=AREAS, default="whole",
        help="whole: inpaint the whole picture at --W x --H; only_masked: cut out the mask's box (plus padding, at "
             "the W:H aspect), inpaint it at --W x --H (default 512x512) and paste it back (the webui's Only masked)")
    add("--only_masked_padding", type=int, default=32, metavar="PX", help="px around the mask's box (default 32)")
    add("--masked_content", choices=CONTENTS, default="original",
        help="what the masked part starts from: the image (original), its surroundings' colours (fill), noise "
             "(latent_noise) or zeros (latent_nothing) in the latent; as the webui's Masked content")


def check_inpaint_area_args(opt: argparse.Namespace) -> None:
    """The padding in range; only masked's processing size defaults to 512x512 (not the init image's)."""
    if not hasattr(opt, "inpaint_area"):
        return
    if not 0 <= opt.only_masked_padding <= 4096:
        raise UsageError(f"--only_masked_padding must be 0 to 4096 px, got {opt.only_masked_padding}")
    if opt.inpaint_area == "only_masked":
        opt.H = opt.H or ONLY_MASKED_SIZE
        opt.W = opt.W or ONLY_MASKED_SIZE


def mask_options(opt: argparse.Namespace) -> MaskOptions:
    """optimized_inpaint.py's :class:`~ldm.pipeline.request.MaskOptions`: the mask flags and these."""
    return MaskOptions(Path(opt.mask), opt.invert_mask, opt.mask_blur, not opt.no_overlay, opt.inpaint_area,
                       opt.only_masked_padding, opt.masked_content)
