"""The hires fix's upscalers, as AUTOMATIC1111's webui v1.10 has them (``shared.latent_upscale_modes`` and the
``Lanczos`` / ``Nearest`` upscalers of ``modules/upscaler.py``).

Latent upscalers resize the first pass's latents with ``torch.nn.functional.interpolate`` (mode, antialias);
pixel upscalers take the decoded image in 8 bits (the webui's ``astype(np.uint8)``: truncated), resize it with
Pillow, and the caller encodes it again. The webui's pixel path (``Upscaler.upscale``): resize by ``scale =
max(W' / W, H' / H)`` to ``int(W * scale) x int(H * scale)`` with the upscaler's filter, then to the target with
Lanczos when that is another size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Upscaler:
    """One upscaler: the name ``--hires_upscaler`` takes, the webui's label (its ``Hires upscaler`` field), and
    either a latent ``mode`` (with ``antialias``) or a Pillow ``resample`` filter for pixels."""

    name: str
    label: str
    mode: str | None = None
    antialias: bool = False
    resample: int | None = None

    @property
    def latent(self) -> bool:
        return self.mode is not None


UPSCALERS: dict[str, Upscaler] = {u.name: u for u in (
    Upscaler("latent", "Latent", "bilinear"),
    Upscaler("latent-antialiased", "Latent (antialiased)", "bilinear", True),
    Upscaler("latent-bicubic", "Latent (bicubic)", "bicubic"),
    Upscaler("latent-bicubic-antialiased", "Latent (bicubic antialiased)", "bicubic", True),
    Upscaler("latent-nearest", "Latent (nearest)", "nearest"),
    Upscaler("latent-nearest-exact", "Latent (nearest-exact)", "nearest-exact"),
    Upscaler("lanczos", "Lanczos", resample=Image.LANCZOS),
    Upscaler("nearest", "Nearest", resample=Image.NEAREST),
)}
UPSCALER_NAMES = tuple(UPSCALERS)


def find_upscaler(name: str) -> Upscaler | None:
    """The upscaler a name (``latent-bicubic``) or a webui label (``Latent (bicubic)``) means, or None."""
    for upscaler in UPSCALERS.values():
        if name in (upscaler.name, upscaler.label):
            return upscaler
    return None


def upscale_latents(latents: torch.Tensor, upscaler: Upscaler, height: int, width: int) -> torch.Tensor:
    """``[B, C, h, w]`` latents to ``[B, C, height, width]`` (latent units) as the webui's hires pass."""
    return F.interpolate(latents, size=(height, width), mode=upscaler.mode, antialias=upscaler.antialias)


def to_webui_uint8(decoded: torch.Tensor) -> np.ndarray:
    """A decoded ``[3, H, W]`` image in [-1, 1] as ``[H, W, 3]`` uint8, truncated as the webui's hires pass does
    (``(255 * clamp((x + 1) / 2, 0, 1)).astype(np.uint8)``)."""
    unit = torch.clamp((decoded.float().cpu() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * np.moveaxis(unit.numpy(), 0, 2)).astype(np.uint8)


def upscale_pixels(image: np.ndarray, upscaler: Upscaler, width: int, height: int) -> Image.Image:
    """An 8-bit ``[H, W, 3]`` image resized to ``width x height`` as the webui's ``resize_image(0, ...)`` with
    this upscaler: its filter by ``max`` of the two ratios, then Lanczos to the exact size if it differs."""
    picture = Image.fromarray(image)
    scale = max(width / picture.width, height / picture.height)
    if scale > 1.0:
        picture = picture.resize((int(picture.width * scale), int(picture.height * scale)), resample=upscaler.resample)
    if picture.size != (width, height):
        picture = picture.resize((width, height), resample=Image.LANCZOS)
    return picture
