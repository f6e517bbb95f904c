"""txt2img's hires fix as flags (what it does: :mod:`ldm.passes.hires`; docs/cli.md), and its metadata fields as
the webui v1.10 writes them (``Denoising strength``, ``Hires upscale`` or ``Hires resize``, ``Hires steps``,
``Hires upscaler``, and ``Hires sampler`` / ``Hires schedule type`` / ``Hires prompt`` / ``Hires negative prompt``
where they differ from the first pass's; the schedule types compared as walked, ``automatic`` resolved, so that
``--from_png``, which reads the first pass's as named, replays the second pass's)."""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ldm.errors import UsageError
from ldm.passes.hires import checked_target
from ldm.passes.upscalers import UPSCALER_NAMES, find_upscaler
from ldm.pipeline.request import GenerationRequest, HiresOptions
from ldm.samplers import SAMPLERS, find_sampler, resolve_schedule, sampler_record
from ldm.samplers.schedules import SCHEDULES, find_schedule

HIRES_DESTS = ("hires_scale", "hires_resize", "hires_steps", "hires_strength", "hires_upscaler", "hires_sampler",
          "hires_schedule", "hires_prompt", "hires_negative_prompt")


def add_hires_flags(add: Callable[..., object]) -> None:
    """The flags, added with the parser's ``add_argument`` (txt2img only)."""
    add("--hires_scale", type=float, default=None, metavar="F",
        help="hires fix: make the picture at --W x --H, then again at int(W*F) x int(H*F) by img2img (the webui's)")
    add("--hires_resize", type=str, default=None, metavar="WxH",
        help="hires fix to this size instead of a scale (0 on one side keeps the aspect; both: cover, then crop)")
    add("--hires_steps", type=int, default=0, metavar="N", help="the second pass's steps (0: --ddim_steps)")
    add("--hires_strength", type=float, default=0.7, metavar="D",
        help="the second pass's denoising strength, above 0 up to 1 (default 0.7)")
    add("--hires_upscaler", type=str, default="latent", metavar="NAME",
        help="one of: " + ", ".join(UPSCALER_NAMES) + " (or the webui's labels: \"Latent (bicubic)\", \"Lanczos\")")
    add("--hires_sampler", type=str, default=None, metavar="NAME", help="the second pass's sampler (default: --sampler)")
    add("--hires_schedule", type=str, default=None, metavar="NAME", help="the second pass's schedule (default: --schedule)")
    add("--hires_prompt", type=str, default=None, help="the second pass's prompt (default: --prompt)")
    add("--hires_negative_prompt", type=str, default=None, help="the second pass's negative prompt (default: --negative_prompt)")


def parse_resize(text: str) -> tuple[int, int]:
    """``--hires_resize WxH``: px, one side may be 0 (keep the aspect), not both."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise UsageError(f"--hires_resize must be WIDTHxHEIGHT in pixels, like 1024x1536, got {text!r}")
    width, height = (int(part) for part in parts)
    if width == height == 0 or width > 8192 or height > 8192:
        raise UsageError(f"--hires_resize: sides up to 8192 px, at most one of them 0, got {text!r}")
    return width, height


def check_hires_args(opt: argparse.Namespace) -> None:
    """Numbers in range, known names (then in this tool's spelling), a target the UNet takes; the other
    ``--hires_*`` flags only with ``--hires_scale`` or ``--hires_resize``."""
    if not hasattr(opt, "hires_scale"):
        return
    if opt.hires_scale is None and opt.hires_resize is None:
        defaults = {"hires_steps": 0, "hires_strength": 0.7, "hires_upscaler": "latent"}
        given = [d for d in HIRES_DESTS[2:] if getattr(opt, d) != defaults.get(d)]
        if given:
            raise UsageError(f"--{given[0]} goes with --hires_scale F or --hires_resize WxH (the hires fix)")
        return
    if opt.hires_scale is not None and opt.hires_resize is not None:
        raise UsageError("give --hires_scale or --hires_resize, not both")
    if opt.hires_scale is not None and not (math.isfinite(opt.hires_scale) and 0 < opt.hires_scale <= 16):
        raise UsageError(f"--hires_scale must be above 0 and at most 16, got {opt.hires_scale}")
    if not 0 <= opt.hires_steps <= 1000:
        raise UsageError(f"--hires_steps must be 0 (--ddim_steps) to 1000, got {opt.hires_steps}")
    if not 0 < opt.hires_strength <= 1:
        raise UsageError(f"--hires_strength must be above 0 and at most 1, got {opt.hires_strength}")
    upscaler = find_upscaler(opt.hires_upscaler)
    if upscaler is None:
        raise UsageError(f"unknown --hires_upscaler {opt.hires_upscaler!r}; choose one of: {', '.join(UPSCALER_NAMES)}")
    opt.hires_upscaler = upscaler.name
    if opt.hires_sampler is not None:
        found = find_sampler(opt.hires_sampler)
        if found is None:
            raise UsageError(f"unknown --hires_sampler {opt.hires_sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        opt.hires_sampler = found[0].name
        if found[1] is not None and opt.hires_schedule is None:
            opt.hires_schedule = found[1]
    if opt.hires_schedule is not None:
        record = find_schedule(opt.hires_schedule)
        if record is None:
            raise UsageError(f"unknown --hires_schedule {opt.hires_schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        opt.hires_schedule = record.name
    checked_target(opt.W, opt.H, hires_options(opt))


def hires_options(opt: argparse.Namespace) -> HiresOptions | None:
    """The request's :class:`~ldm.pipeline.request.HiresOptions`, or None without the hires fix."""
    if getattr(opt, "hires_scale", None) is None and getattr(opt, "hires_resize", None) is None:
        return None
    return HiresOptions(
        scale=opt.hires_scale or 0.0, resize=None if opt.hires_resize is None else parse_resize(opt.hires_resize),
        steps=opt.hires_steps, strength=opt.hires_strength, upscaler=opt.hires_upscaler, sampler=opt.hires_sampler,
        schedule=opt.hires_schedule, prompt=opt.hires_prompt, negative_prompt=opt.hires_negative_prompt,
    )


def _number(value: float) -> str:
    """2.0 -> "2", 1.5 -> "1.5" (the webui writes the number it was given)."""
    return f"{value:g}"


def hires_fields(request: GenerationRequest) -> dict[str, str]:
    """The hires fix's metadata fields, as the webui writes them (none without the hires fix)."""
    options = request.hires
    if options is None:
        return {}
    fields = {"Denoising strength": repr(float(options.strength))}
    if options.resize is None:
        fields["Hires upscale"] = _number(options.scale)
    else:
        fields["Hires resize"] = "{}x{}".format(*options.resize)
    if options.steps:
        fields["Hires steps"] = str(options.steps)
    fields["Hires upscaler"] = find_upscaler(options.upscaler).label
    if options.sampler is not None and options.sampler != request.sampler:
        fields["Hires sampler"] = sampler_record(options.sampler).label
    hires_schedule = resolve_schedule(options.sampler or request.sampler, options.schedule or request.schedule)
    if hires_schedule != resolve_schedule(request.sampler, request.schedule):  # what each pass walked
        fields["Hires schedule type"] = SCHEDULES[hires_schedule].label
    if options.prompt is not None and options.prompt != request.prompt:
        fields["Hires prompt"] = options.prompt
    if options.negative_prompt is not None and options.negative_prompt != request.negative_prompt:
        fields["Hires negative prompt"] = options.negative_prompt
    return fields
