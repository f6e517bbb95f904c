"""The geometry of "Inpaint area: Only masked", as AUTOMATIC1111's webui (``modules/masking.py``
``get_crop_region`` / ``expand_crop_region``, ``modules/images.py`` ``resize_image`` modes 1 and 2).

Boxes are ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive (Pillow's ``crop``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]


def crop_region(mask: np.ndarray, pad: int) -> Box:
    """The box around the mask's non-zero pixels (``mask`` uint8 or float ``[H, W]``), widened by ``pad`` on every
    side and clipped to the image (the webui's ``get_crop_region``)."""
    rows, cols = np.nonzero(np.any(mask != 0, axis=1))[0], np.nonzero(np.any(mask != 0, axis=0))[0]
    h, w = mask.shape
    if len(rows) == 0:  # nothing masked: the webui's degenerate box
        return max(w - pad, 0), max(h - pad, 0), min(pad, w), min(pad, h)
    return max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w), \
        min(int(rows[-1]) + 1 + pad, h)


def _widen(low: int, high: int, desired: float, size: int) -> tuple[int, int]:
    """One axis of ``expand_crop_region``: grow ``[low, high)`` to ``desired`` about its centre, shifted back inside
    ``[0, size)`` where it sticks out, clipped where it is larger than the image."""
    diff = int(desired - (high - low))
    low, high = low - diff // 2, high + diff - diff // 2
    if high >= size:
        low, high = low - (high - size), size
    if low < 0:
        low, high = 0, high - low
    return low, min(high, size)


def expand_crop_region(box: Box, width: int, height: int, image_width: int, image_height: int) -> Box:
    """``box`` grown to the ``width : height`` aspect of the run, inside an ``image_width x image_height`` image (the
    webui's ``expand_crop_region``: a 128x32 box for a 512x512 run becomes 128x128)."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, (x2 - x1) / ratio, image_height)
    else:
        x1, x2 = _widen(x1, x2, (y2 - y1) * ratio, image_width)
    return x1, y1, x2, y2


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """The webui's ``resize_image(2, ...)``: fit inside ``width x height`` (Lanczos), the gap filled by stretching
    the picture's edge rows or columns."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and height // 2 - src_h // 2 > 0:
        fill = height // 2 - src_h // 2
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio and width // 2 - src_w // 2 > 0:
        fill = width // 2 - src_w // 2
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return out


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The webui's ``resize_image(1, ...)``: cover ``width x height`` (Lanczos), centred, the overhang cut off."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out
