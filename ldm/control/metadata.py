"""ControlNet's fields in an image's parameters, as the webui ControlNet extension writes them
(``scripts/infotext.py``: one ``ControlNet <i>`` entry per unit, the unit's fields as ``Display Name: value``
joined by ", ", A1111-quoted since it holds commas), and read back for ``--from_png``::

    ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and
    Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0,
    Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"

The model is named by its file's stem (a diffusers folder: the folder's name) and the webui's old short hash
(:func:`ldm.control.files.webui_model_hash`). The slider fields a module hides (``none``, ``invert``: no
processor resolution, no thresholds) are left out, as the extension leaves out their -1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ldm.control.units import ControlSpec

RESIZE_MODE = "Crop and Resize"
CONTROL_MODE = "Balanced"  # diffusers' semantics: the residuals on both halves of guidance
PROCESSOR_RES = 512
FIELD = re.compile(r"^ControlNet (\d+)$")
_MODEL = re.compile(r"^(.*?)(?: \[([0-9a-fA-F]{8,10})\])?$")
MODEL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin", ".pt")


def unit_text(spec: ControlSpec, model_hash: str | None) -> str:
    """One unit's entry (unquoted)."""
    name = spec.model.name if spec.model.is_dir() else spec.model.stem
    fields = {"Module": spec.preprocess, "Model": f"{name} [{model_hash}]" if model_hash else name,
              "Weight": repr(float(spec.weight)), "Resize Mode": RESIZE_MODE, "Low Vram": "False"}
    if spec.preprocess == "canny":
        fields.update({"Processor Res": str(PROCESSOR_RES), "Threshold A": str(spec.canny_low),
                       "Threshold B": str(spec.canny_high)})
    fields.update({"Guidance Start": repr(float(spec.start)), "Guidance End": repr(float(spec.end)),
                   "Pixel Perfect": "False", "Control Mode": CONTROL_MODE})
    return ", ".join(f"{key}: {value}" for key, value in fields.items())


def control_fields(specs: Sequence[ControlSpec], hashes: Sequence[str | None]) -> dict[str, str]:
    """``{"ControlNet 0": entry, ...}`` for the run's ControlNets."""
    return {f"ControlNet {i}": unit_text(spec, h) for i, (spec, h) in enumerate(zip(specs, hashes, strict=True))}


@dataclass(frozen=True)
class RestoredUnit:
    """One ``ControlNet <i>`` entry read back."""

    index: int
    module: str
    model_name: str
    model_hash: str | None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    threshold_a: int | None = None
    threshold_b: int | None = None


def parse_unit(index: int, text: str) -> RestoredUnit:
    """An entry's fields (unknown ones are skipped, as the extension's parser does); ValueError when a number is
    not one or the model is missing."""
    values = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if sep:
            values[key] = value.strip()
    if "Model" not in values:
        raise ValueError(f"ControlNet {index}: no Model field")
    name, model_hash = _MODEL.match(values["Model"]).groups()

    def number(key: str, default, kind=float):
        return kind(float(values[key])) if key in values else default

    return RestoredUnit(index, values.get("Module", "none"), name, model_hash, number("Weight", 1.0),
                        number("Guidance Start", 0.0), number("Guidance End", 1.0), number("Threshold A", None, int),
                        number("Threshold B", None, int))


def take_units(fields: dict[str, str]) -> tuple[dict[str, str], list[RestoredUnit]]:
    """The fields without the ``ControlNet <i>`` entries, and those entries read, in index order."""
    rest, units = {}, []
    for key, value in fields.items():
        match = FIELD.match(key)
        if match:
            units.append(parse_unit(int(match.group(1)), value))
        else:
            rest[key] = value
    return rest, sorted(units, key=lambda unit: unit.index)


def find_model(name: str, folder: Path) -> Path | None:
    """The file (or diffusers folder) named ``name`` in ``folder``, or None."""
    for suffix in MODEL_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    if (folder / name / "config.json").is_file():
        return folder / name
    return None
