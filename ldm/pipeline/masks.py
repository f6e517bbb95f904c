"""The inpainting mask, read from the user's file, and the overlay of the kept pixels on the result.

Convention (diffusers', the webui's): white = repaint, black = keep; grey is in between until the model
binarizes it at 0.5 (:mod:`ldm.pipeline.inpainting`), while the overlay uses the grey levels as they are.

Reading (:func:`load_mask`): any image Pillow opens, EXIF rotation applied, resized to the output size
with LANCZOS (as diffusers' mask processor resizes). One channel is taken from it:

- an image with transparency whose colour channels are uniform (one flat colour, e.g. strokes painted on
  a transparent layer): its alpha, opaque = repaint;
- any other image: its luminance (ITU-R 601, Pillow's ``convert("L")``), alpha ignored.

Then ``--invert_mask`` swaps repaint and keep, and ``--mask_blur PX`` blurs the mask with a Gaussian of
standard deviation PX pixels (the webui's "Mask blur", default 4; Pillow's ``GaussianBlur``), which softens
the seam of the overlay.

Overlay (:func:`apply_overlay`, on by default, ``--no_overlay`` to skip): the output's pixels are the init
image's blended through the blurred mask, ``init * (1 - m) + decoded * m``, so where the mask is 0 the
user's pixels come back exactly (the VAE round trip would otherwise soften them), as the webui pastes the
init image back through the inverted mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ldm.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_MASK_BLUR = 4
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _one_channel(image: Image.Image) -> Image.Image:
    """The mask channel ("L"): alpha for a flat colour with transparency, else luminance."""
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit greyscale PNGs: 65535 is white (convert("L") would clip)
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8), "L")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        extrema = rgba.convert("RGB").getextrema()
        if all(low == high for low, high in extrema):
            return rgba.getchannel("A")
        return rgba.convert("RGB").convert("L")
    return image.convert("L")


def load_mask(path: str | Path, width: int, height: int, *, invert: bool = False, blur: float = 0) -> np.ndarray:
    """The mask at ``width`` x ``height``: float32 ``[H, W]`` in [0, 1], 1 = repaint, after invert and blur.

    A missing or unreadable file, or a mask with nothing to repaint (no value >= 0.5 once inverted and
    blurred), is a :class:`UsageError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"mask not found: {path}")
    if blur < 0:
        raise UsageError(f"--mask_blur must be >= 0, got {blur}")
    try:
        with Image.open(path) as opened:
            mask = _one_channel(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read mask {path}: {error}") from None
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(mask, dtype=np.float32) / 255.0
    if not (array >= 0.5).any():
        what = "no pixel is white" + (" after --invert_mask" if invert else "") + (" and --mask_blur" if blur else "")
        raise UsageError(f"mask {path} has nothing to repaint ({what}; white = repaint, black = keep)")
    return array


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """``[H, W]`` mask -> ``[1, 1, H, W]`` float32 tensor, the form :mod:`ldm.pipeline.inpainting` takes."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def init_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The init image as the model sees it, uint8 ``[H, W, 3]`` (resized with LANCZOS when sizes differ)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def apply_overlay(decoded: np.ndarray, init: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``round(init * (1 - m) + decoded * m)``, uint8 ``[H, W, 3]``: exactly ``init`` where ``m == 0``,
    exactly ``decoded`` where ``m == 1``."""
    if decoded.shape != init.shape or decoded.shape[:2] != mask.shape:
        raise ValueError(f"overlay sizes differ: decoded {decoded.shape}, init {init.shape}, mask {mask.shape}")
    m = mask.astype(np.float64)[..., None]
    blended = init.astype(np.float64) * (1 - m) + decoded.astype(np.float64) * m
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
