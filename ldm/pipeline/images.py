"""Input images: reading the init image, its size for the run, and turning it into a tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.errors import UsageError
from ldm.pipeline.input_checks import open_init_image
from ldm.pipeline.request import SIZE_MULTIPLE, GenerationRequest


def load_init_image(path: str | Path) -> Image.Image:
    """Any image Pillow opens, as 8-bit RGB: its size checked from the header before decoding, EXIF rotation
    applied, 16-bit and float images scaled (not clipped), palette and alpha flattened
    (:func:`ldm.pipeline.input_checks.open_init_image`)."""
    return open_init_image(path)


def output_size(request: GenerationRequest, init_image: Image.Image | None) -> tuple[int, int]:
    """``(height, width)``: ``--H``/``--W``, else (img2img) the init image's floored to a multiple of 64."""
    height = request.height if request.height is not None else init_image.height // SIZE_MULTIPLE * SIZE_MULTIPLE
    width = request.width if request.width is not None else init_image.width // SIZE_MULTIPLE * SIZE_MULTIPLE
    if height <= 0 or width <= 0:
        raise UsageError(f"init image {request.init_img} is {init_image.width}x{init_image.height}; "
                         f"give --H/--W or an image at least {SIZE_MULTIPLE} px on each side")
    return height, width


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> ``[1, 3, H, W]`` float32 in [-1, 1], resized with LANCZOS when its size differs."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0
