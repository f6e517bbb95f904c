"""The sd-webui-controlnet extension's API (Mikubill/sd-webui-controlnet ``scripts/api.py``,
``internal_controlnet/external_code.py``): a request's ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}``
becomes the scripts' ``--control_*`` flags (:mod:`optimizedSD.flags.control`), and ``/controlnet/model_list``,
``/controlnet/module_list``, ``/controlnet/version`` answer as the extension does.

A unit's fields mean what the extension's ``ControlNetUnit`` means: ``enabled`` (false: the unit is skipped),
``module`` (the preprocessors that need no weights: none, canny, invert), ``model`` ("NAME [HASH]" or NAME, looked
up in ``--control_dir`` as ``--from_png`` looks it up), ``weight``, ``image`` (base64 or a data URL; old clients'
``input_image``; img2img without one: the init image, as the extension takes it), ``guidance_start``/``_end``,
``threshold_a``/``_b`` (Canny's low and high; -1: 100 and 200, the extension's defaults). ``resize_mode``: Crop
and Resize (1, the extension's default) is what the scripts do; Just Resize (0) and Resize and Fill (2) frame the
image the same where its aspect ratio is the output's, and are refused otherwise. ``control_mode``: Balanced (0)
only. ``processor_res``, ``pixel_perfect``, ``low_vram`` and ``hr_option`` ask for nothing here (the map is made at
the output size, the memory mode is the server's).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ldm.control.files import webui_model_hash
from ldm.control.hints import CANNY_HIGH, CANNY_LOW, PREPROCESSORS
from ldm.control.metadata import MODEL_SUFFIXES, PROCESSOR_RES, find_model
from ldm.errors import UsageError

log = logging.getLogger(__name__)

API_VERSION = 2  # external_code.get_api_version()
UNIT_COUNT = 3  # the extension's default control_net_unit_count
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill", 3: "Just Resize",
                "Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
_RESOLUTION = {"name": "Preprocessor Resolution", "value": PROCESSOR_RES, "min": 64, "max": 2048}
SLIDERS: dict[str, list[dict[str, Any]]] = {
    "none": [], "invert": [_RESOLUTION],
    "canny": [_RESOLUTION, {"name": "Canny Low Threshold", "value": CANNY_LOW, "min": 1, "max": 255},
              {"name": "Canny High Threshold", "value": CANNY_HIGH, "min": 1, "max": 255}],
}


@dataclass(frozen=True)
class ApiUnit:
    """One enabled unit, checked: its model file, image bytes and the numbers of its flags."""

    index: int
    model: Path
    image: bytes | None  # None: the init image (img2img)
    module: str
    weight: float
    start: float
    end: float
    canny: tuple[int, int] | None  # (low, high) for a canny unit
    save_map: bool = True  # save_detected_map: its map is appended to the answer's images


def model_list(folder: Path) -> list[str]:
    """``GET /controlnet/model_list``: "NAME [HASH]" of each ControlNet file (or diffusers folder) in ``folder``."""
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.iterdir()
                    if (p.is_file() and p.suffix in MODEL_SUFFIXES) or (p / "config.json").is_file()),
                   key=lambda p: p.name.lower())
    return [f"{p.name if p.is_dir() else p.stem} [{webui_model_hash(p)}]" for p in found]


def module_list() -> dict[str, Any]:
    """``GET /controlnet/module_list``: the preprocessors and their sliders, in the extension's shape."""
    return {"module_list": list(PREPROCESSORS),
            "module_detail": {name: {"model_free": False, "sliders": SLIDERS[name]} for name in PREPROCESSORS}}


def find_control_model(name: str, folder: Path) -> Path:
    """The file ``name`` ("NAME [HASH]" or NAME) means in ``folder``, as the extension's
    ``find_closest_lora_model_name``: by name in any case, else the shortest name containing it; else by hash. A
    one-line :class:`UsageError` listing the models there."""
    base, _, rest = name.strip().partition(" [")
    wanted_hash = rest.rstrip("]").lower() if rest else None
    path = find_model(base, folder)
    entries = [entry.rpartition(" [") for entry in model_list(folder)] if path is None else []
    if path is None:  # entries: (name, " [", "hash]")
        names = sorted((n for n, _, _ in entries if base.lower() in n.lower()),
                       key=lambda n: (n.lower() != base.lower(), len(n)))
        by_hash = [n for n, _, h in entries if wanted_hash and h.rstrip("]") == wanted_hash]
        found = (names or by_hash or [None])[0]
        path = find_model(found, folder) if found is not None else None
    if path is None:
        raise UsageError(f"model {name!r} is not in {folder}; one of: {', '.join(model_list(folder)) or 'none there'}")
    if wanted_hash and webui_model_hash(path) != wanted_hash:
        log.warning("ControlNet %s: the file's hash is not [%s]", path, wanted_hash)
    return path


def raw_units(extra: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The units of ``alwayson_scripts`` (its key in any case, as the webui matches script names)."""
    scripts = (extra or {}).get("alwayson_scripts") or {}
    entry = next((value for key, value in scripts.items() if str(key).lower() == "controlnet"), None) \
        if isinstance(scripts, dict) else None
    if entry is None:
        return []
    args = entry.get("args", []) if isinstance(entry, dict) else entry
    if not isinstance(args, list):
        raise UsageError("alwayson_scripts.controlnet.args must be a list of ControlNet units (JSON objects)")
    return [unit for unit in args if isinstance(unit, dict)]  # as get_all_units_from: other entries are no units


def image_field(index: int, unit: dict[str, Any]) -> str | None:
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
        if image.get("mask"):
            raise UsageError(f"controlnet unit {index}: an image mask is not supported")
        image = image.get("image")
    if unit.get("mask") or unit.get("mask_image"):
        raise UsageError(f"controlnet unit {index}: an image mask is not supported")
    if image and not isinstance(image, str):
        raise UsageError(f"controlnet unit {index}: image must be base64 text (or a data:image/...;base64, URL)")
    return image or None


def _number(index: int, unit: dict[str, Any], name: str, default: float) -> float:
    value = unit.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"controlnet unit {index}: {name} must be a number, got {value!r}")
    return float(value)


def check_unit(index: int, unit: dict[str, Any], folder: Path, image: bytes | None, size: tuple[int, int]) -> ApiUnit:
    """One enabled unit's fields checked as the extension reads them; ``size`` is the output's (width, height)."""
    module = str(unit.get("module") or "none")
    if module not in PREPROCESSORS:
        raise UsageError(f"controlnet unit {index}: module {module!r} is not one of: {', '.join(PREPROCESSORS)} "
                         "(preprocessors that need their own models are not supported; send the map with module none)")
    model = str(unit.get("model") or "None")
    if model == "None":
        listed = ", ".join(model_list(folder)) or f"none in {folder}"
        raise UsageError(f"controlnet unit {index}: no model; one of: {listed}")
    control_mode = unit.get("control_mode", 0)
    if control_mode not in (0, CONTROL_MODES[0]):
        raise UsageError(f"controlnet unit {index}: control_mode {control_mode!r} is not supported (only Balanced, 0)")
    weight, start, end = (_number(index, unit, name, default) for name, default in
                          (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0)))
    check_resize_mode(index, unit.get("resize_mode", 1), image, size)
    canny = None
    if module == "canny":
        low, high = (_number(index, unit, name, default) for name, default in
                     (("threshold_a", CANNY_LOW), ("threshold_b", CANNY_HIGH)))
        canny = (CANNY_LOW if low < 0 else int(round(low)), CANNY_HIGH if high < 0 else int(round(high)))
    return ApiUnit(index, find_control_model(model, folder), image, module, weight, start, end, canny,
                   bool(unit.get("save_detected_map", True)))


def check_resize_mode(index: int, mode: Any, image: bytes | None, size: tuple[int, int]) -> None:
    """Crop and Resize always; Just Resize and Resize and Fill where they frame the image as it does (its aspect
    ratio the output's: scaled to cover the output it needs no crop)."""
    name = RESIZE_MODES.get(mode, mode) if isinstance(mode, (str, int)) and not isinstance(mode, bool) else None
    if name == "Crop and Resize":
        return
    if name not in ("Just Resize", "Resize and Fill"):
        raise UsageError(f"controlnet unit {index}: resize_mode {mode!r} is not one of: Just Resize, Crop and Resize, "
                         "Resize and Fill (0, 1, 2)")
    if image is None:
        return  # the init image, already at the output's size's ratio or resized by the scripts as img2img does
    try:
        with Image.open(io.BytesIO(image)) as opened:
            w, h = opened.size
    except (UnidentifiedImageError, OSError, ValueError):
        return  # the scripts' image checks name it
    k = max(size[0] / w, size[1] / h)
    if (round(w * k), round(h * k)) != size:
        raise UsageError(f"controlnet unit {index}: resize_mode {name} of a {w}x{h} image to {size[0]}x{size[1]} "
                         "is not supported; use Crop and Resize (1), or an image of the output's aspect ratio")


def control_units(extra: dict[str, Any] | None, folder: Path, size: tuple[int, int], decode) -> list[ApiUnit]:
    """The enabled units of a request (``decode(text, field)``: an image field's bytes)."""
    units = []
    for index, unit in enumerate(raw_units(extra)):
        if not unit.get("enabled", True):
            continue
        text = image_field(index, unit)
        image = decode(text, f"controlnet unit {index} image") if text else None
        units.append(check_unit(index, unit, folder, image, size))
    cannies = {unit.canny for unit in units if unit.canny is not None}
    if len(cannies) > 1:
        raise UsageError("controlnet units: one pair of Canny thresholds (threshold_a, threshold_b) per request, got "
                         + ", ".join(f"{low}/{high}" for low, high in sorted(cannies)))
    return units


def control_argv(units: list[ApiUnit], folder: Path, init: Path | None, maps: bool = True) -> list[str]:
    """The scripts' ``--control_*`` flags of ``units``, their images written under ``folder``; with ``maps``
    (the option ``control_net_no_detectmap`` off) ``--save_control_map`` where a unit's map is answered."""
    argv: list[str] = ["--save_control_map"] if maps and any(unit.save_map for unit in units) else []
    for unit in units:
        if unit.image is None and init is None:
            raise UsageError(f"controlnet unit {unit.index}: no image (send image, base64 or a data URL)")
        image = init
        if unit.image is not None:
            image = folder / f"control_image_{unit.index}"
            image.write_bytes(unit.image)
        argv += ["--control_model", str(unit.model), "--control_image", str(image), "--control_weight",
                 repr(unit.weight), "--control_start", repr(unit.start), "--control_end", repr(unit.end),
                 "--control_preprocess", unit.module]
    canny = next((unit.canny for unit in units if unit.canny is not None), None)
    if canny is not None:
        argv += ["--canny_low", str(canny[0]), "--canny_high", str(canny[1])]
    return argv


def detected_maps(units: list[ApiUnit], sample: Path) -> list[Path]:
    """The maps the extension appends to the images (each unit's with ``save_detected_map``, in order): the
    scripts' ``--save_control_map`` files beside the last ``sample``."""
    paths = [sample.with_name(f"{sample.stem}-control{n}.png") for n, unit in enumerate(units) if unit.save_map]
    return [path for path in paths if path.is_file()]
