"""ControlNet's flags: ``--control_model FILE --control_image IMG`` (repeatable: the n-th image goes with the n-th
model), ``--control_weight``, ``--control_start``, ``--control_end``, ``--control_preprocess`` (each repeatable,
in the same order; a model without its own takes the default), ``--canny_low``/``--canny_high``,
``--save_control_map`` and ``--control_dir`` (what they do: :mod:`ldm.control`; docs/cli.md)."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ldm.control.files import webui_model_hash
from ldm.control.hints import CANNY_HIGH, CANNY_LOW, PREPROCESSORS
from ldm.control.metadata import RestoredUnit, find_model, take_units
from ldm.control.units import ControlSpec
from ldm.errors import UsageError
from optimizedSD.infotext import Infotext

log = logging.getLogger(__name__)

DEFAULT_CONTROL_DIR = Path("models") / "ControlNet"
_PER_MODEL = ("control_weight", "control_start", "control_end", "control_preprocess")


def add_control_flags(add: Callable[..., object]) -> None:
    """The flags, added with the parser's ``add_argument``."""
    add("--control_model", action="append", default=[], metavar="FILE",
        help="a ControlNet for SD v1 (control_v11p_sd15_*.pth/.safetensors, a 1.0 control_sd15_*.pth, or a diffusers "
             "ControlNet folder); repeat for several, each with its own --control_image")
    add("--control_image", action="append", default=[], metavar="IMG",
        help="the n-th ControlNet's image, cropped and resized to the output as the webui's Crop and Resize")
    add("--control_weight", action="append", type=float, default=[], metavar="W",
        help="the n-th ControlNet's weight (default 1; 0: no effect)")
    add("--control_start", action="append", type=float, default=[], metavar="S",
        help="the n-th ControlNet acts from this fraction of the steps (default 0)")
    add("--control_end", action="append", type=float, default=[], metavar="E",
        help="the n-th ControlNet acts until this fraction of the steps (default 1)")
    add("--control_preprocess", action="append", choices=PREPROCESSORS, default=[],
        help="the n-th image's preprocessor: none (default; the image is the map), invert (white background "
             "and black lines to the reverse), canny (OpenCV's Canny edges)")
    add("--canny_low", type=int, default=CANNY_LOW, metavar="T", help="Canny's low threshold (default 100)")
    add("--canny_high", type=int, default=CANNY_HIGH, metavar="T", help="Canny's high threshold (default 200)")
    add("--save_control_map", action="store_true",
        help="write each ControlNet's preprocessed map beside the images (NAME-control0.png, ...)")
    add("--control_dir", type=str, default=str(DEFAULT_CONTROL_DIR), metavar="DIR",
        help="where --from_png looks up the ControlNets a PNG names (default models/ControlNet)")


def check_control_args(opt: argparse.Namespace) -> None:
    """Counts that pair up, numbers in range; files are looked at later (before the model load)."""
    models = len(opt.control_model)
    if models and (getattr(opt, "hires_scale", None) is not None or getattr(opt, "hires_resize", None) is not None):
        raise UsageError("--control_model with the hires fix (--hires_scale/--hires_resize) is not supported yet")
    if models and getattr(opt, "inpaint_area", "whole") == "only_masked":
        raise UsageError("--control_model with --inpaint_area only_masked is not supported yet")
    if len(opt.control_image) != models and not (opt.plan and not opt.control_image):
        raise UsageError(f"give one --control_image for each --control_model: {models} models, "
                         f"{len(opt.control_image)} images")
    for name in _PER_MODEL:
        if len(getattr(opt, name)) > models:
            raise UsageError(f"--{name} given {len(getattr(opt, name))} times for {models} --control_model")
    for weight in opt.control_weight:
        if not math.isfinite(weight) or not -10 <= weight <= 10:
            raise UsageError(f"--control_weight must be a number between -10 and 10, got {weight}")
    for start, end in zip(values(opt, "control_start", 0.0), values(opt, "control_end", 1.0)):
        if not (0 <= start <= 1 and 0 <= end <= 1) or start >= end:
            raise UsageError(f"--control_start and --control_end must be fractions with start < end, got {start} and {end}")
    if not (0 <= opt.canny_low <= 255 and 0 <= opt.canny_high <= 255 and opt.canny_low <= opt.canny_high):
        raise UsageError(f"--canny_low and --canny_high must be 0 to 255, low <= high, got {opt.canny_low} and {opt.canny_high}")


def values(opt: argparse.Namespace, name: str, default) -> list:
    """The per-model values of flag ``name``, the default for each model without its own."""
    given = list(getattr(opt, name))
    return given + [default] * (len(opt.control_model) - len(given))


def control_settings(opt: argparse.Namespace) -> dict[str, object]:
    """The :class:`ldm.pipeline.request.GenerationRequest` fields of these flags."""
    images = [Path(p) for p in opt.control_image] or [None] * len(opt.control_model)
    specs = tuple(
        ControlSpec(Path(model), image, weight, start, end, preprocess, opt.canny_low, opt.canny_high)
        for model, image, weight, start, end, preprocess in zip(
            opt.control_model, images, values(opt, "control_weight", 1.0), values(opt, "control_start", 0.0),
            values(opt, "control_end", 1.0), values(opt, "control_preprocess", "none"))
    )
    return {"control": specs, "save_control_map": opt.save_control_map}


def restore_control(opt: argparse.Namespace, given: set[str], info: Infotext) -> tuple[Infotext, list[RestoredUnit]]:
    """``--from_png``: the image's ``ControlNet <i>`` entries (the webui extension's) become the ControlNet flags
    not given, each model looked up by name in ``--control_dir`` (its short hash checked), with the images of
    ``--control_image`` in the same order; returns the infotext without those entries, and the entries."""
    try:
        fields, units = take_units(info.fields)
    except ValueError as error:
        raise UsageError(f"--from_png: {error}") from None
    if not units or "control_model" in given:  # the command line's ControlNets win
        return replace(info, fields=fields), units
    if len(opt.control_image) != len(units):
        raise UsageError(f"--from_png: the image was made with {len(units)} ControlNet(s): give --control_image "
                         f"once for each ({len(opt.control_image)} given)")
    folder = Path(opt.control_dir)
    models = []
    for unit in units:
        path = find_model(unit.model_name, folder)
        if path is None:
            raise UsageError(f"--from_png: ControlNet {unit.index} is {unit.model_name}, not found in {folder} "
                             "(give --control_dir or --control_model)")
        if unit.model_hash and webui_model_hash(path) != unit.model_hash.lower():
            log.warning("--from_png: %s's hash is not the image's [%s]", path, unit.model_hash)
        if unit.module not in PREPROCESSORS and "control_preprocess" not in given:
            raise UsageError(f"--from_png: ControlNet {unit.index}'s preprocessor {unit.module} needs its own model "
                             "(not supported): give its map as --control_image with --control_preprocess none")
        models.append(str(path))
    opt.control_model = models
    for dest, values in (("control_weight", [u.weight for u in units]), ("control_start", [u.start for u in units]),
                         ("control_end", [u.end for u in units]), ("control_preprocess", [u.module for u in units])):
        if dest not in given:
            setattr(opt, dest, values)
    canny = next((u for u in units if u.module == "canny" and u.threshold_a is not None), None)
    if canny is not None:
        for dest, value in (("canny_low", canny.threshold_a), ("canny_high", canny.threshold_b)):
            if dest not in given and value is not None:
                setattr(opt, dest, value)
    return replace(info, fields=fields), units
