"""One ControlNet of a run: what the user asked (:class:`ControlSpec`, part of the request) and what the run
holds (:class:`ControlUnit`: the network under the residency, its hint, its weight and its window of steps)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ldm.config import ModelConfig, UNetConfig
from ldm.control.files import load_control_net
from ldm.control.hints import control_map, hint_tensor
from ldm.control.network import ControlNet
from ldm.control.placement import ControlResidency, PlacedControlNet


@dataclass(frozen=True)
class ControlSpec:
    """``--control_model``, ``--control_image`` and the flags that go with the n-th pair."""

    model: Path
    image: Path | None  # None only where the ledger plans without reading the image (--plan)
    weight: float = 1.0
    start: float = 0.0  # fractions of the steps: active while start <= step / steps and (step + 1) / steps <= end
    end: float = 1.0
    preprocess: str = "none"
    canny_low: int = 100
    canny_high: int = 200


@dataclass
class ControlUnit:
    """A ControlNet placed under the residency, its hint ``[1, 3, H, W]`` in [0, 1] and its schedule."""

    placed: PlacedControlNet
    hint: torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    map: np.ndarray | None = None  # the preprocessed map (H x W x 3 uint8), for --save_control_map

    def active(self, step: int, steps: int) -> bool:
        """diffusers' ``controlnet_keep``: off while ``step / steps < start`` or ``(step + 1) / steps > end``;
        and off at weight 0 (the plain image, exactly)."""
        if self.weight == 0:
            return False
        steps = max(steps, 1)
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def control_config(config: ModelConfig) -> UNetConfig:
    """The ControlNet's architecture: the UNet's encoder, on the 4-channel latent (an inpainting UNet takes 9,
    its ControlNets still 4)."""
    return replace(config.unet, in_channels=config.latent_channels)


def meta_units(count: int, config: ModelConfig, dtype: torch.dtype, residency: ControlResidency, width: int,
               height: int) -> tuple[ControlUnit, ...]:
    """``count`` ControlNets of ``config``'s architecture on ``meta`` (no file read) with ``meta`` hints: what the
    VRAM ledger runs for ``--plan``."""
    units = []
    for index in range(count):
        with torch.device("meta"):
            net = ControlNet(control_config(config))
        net.to(dtype).eval().requires_grad_(False)
        hint = torch.zeros((1, 3, height, width), device="meta")
        units.append(ControlUnit(PlacedControlNet(residency, net, f"control.{index}"), hint))
    return tuple(units)


def read_nets(specs: Sequence[ControlSpec], config: ModelConfig, dtype: torch.dtype) -> list[ControlNet]:
    """Each spec's file read and built in ``dtype`` (a file that is no SD v1 ControlNet fails here, in one line)."""
    return [load_control_net(spec.model, control_config(config), dtype) for spec in specs]


def place_units(nets: Sequence[ControlNet], specs: Sequence[ControlSpec], images: Sequence[Image.Image],
                residency: ControlResidency, width: int, height: int) -> tuple[ControlUnit, ...]:
    """The networks placed under ``residency``; each image (``images``, in the specs' order, already opened and
    checked) made into its hint for ``width`` x ``height``."""
    units = []
    for index, (net, spec, image) in enumerate(zip(nets, specs, images, strict=True)):
        control = control_map(image, width, height, spec.preprocess, spec.canny_low, spec.canny_high)
        placed = PlacedControlNet(residency, net, f"control.{index}")
        units.append(ControlUnit(placed, hint_tensor(control), spec.weight, spec.start, spec.end, control))
    return tuple(units)
