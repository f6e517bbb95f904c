"""The hint image a ControlNet sees: the user's image preprocessed, sized to the output as the webui
ControlNet extension's "Crop and Resize" does, and scaled to [0, 1] (as diffusers' ``StableDiffusionControlNetPipeline``
and the extension's ``get_pytorch_control``: ``uint8 / 255``, RGB, no normalisation to [-1, 1]).

Preprocessors that need no weights (the extension's ``scripts/processor.py``):

- ``none``: the image as it is;
- ``invert`` ("invert (from white bg & black line)"): ``255 - image``;
- ``canny``: OpenCV's ``cv2.Canny(image, low, high)`` on the RGB image (the webui's defaults 100 and 200), the
  one-channel edge map repeated to three channels. Run at the output size, after the resize (the extension runs
  it at its "preprocessor resolution", 512 px by default, then resizes the map: the same for 512 px outputs).

"Crop and Resize" (the extension's ``detectmap_proc`` with ``ResizeMode.INNER_FIT``): scale by
``k = max(H / h, W / w)`` to ``(round(w k), round(h k))``, then cut the centre ``W x H``. The scaling is the
extension's ``high_quality_resize``: OpenCV's ``INTER_NEAREST`` for a map of 3 to 199 colours (segmentation
maps), ``INTER_AREA`` when shrinking, ``INTER_CUBIC`` when growing; a black-and-white map is thresholded again
after (Otsu), as there. Not done: its thinning of one-pixel edge maps (``lvmin_thin``) when scaling them.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

PREPROCESSORS = ("none", "invert", "canny")
CANNY_LOW, CANNY_HIGH = 100, 200


def resize_interpolation(image: np.ndarray, size: tuple[int, int]) -> int:
    """The extension's choice of OpenCV interpolation for scaling ``image`` (H x W x 3) to ``size`` (w, h)."""
    colours = len(np.unique(image.reshape(-1, image.shape[2]), axis=0))
    if 2 < colours < 200:
        return cv2.INTER_NEAREST
    if size[0] * size[1] < image.shape[0] * image.shape[1]:
        return cv2.INTER_AREA
    return cv2.INTER_CUBIC


def high_quality_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H x W x 3 uint8) scaled to ``size`` = (w, h) as the extension's ``high_quality_resize``
    (without its one-pixel-edge thinning)."""
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return image
    colours = len(np.unique(image.reshape(-1, image.shape[2]), axis=0))
    binary = colours == 2 and image.min() < 16 and image.max() > 240
    scaled = cv2.resize(image, size, interpolation=resize_interpolation(image, size))
    if binary:
        grey = np.mean(scaled.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        scaled = np.stack([grey] * 3, axis=2)
    return scaled


def crop_and_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The extension's "Crop and Resize": cover ``width`` x ``height`` keeping the aspect, cut the centre."""
    old_h, old_w = image.shape[:2]
    k = max(height / old_h, width / old_w)
    scaled = high_quality_resize(image, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w = scaled.shape[:2]
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(scaled[top:top + height, left:left + width])


def preprocess(image: np.ndarray, name: str, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """A weight-free preprocessor (``none``, ``invert``, ``canny``) on an H x W x 3 uint8 RGB image."""
    if name == "none":
        return image
    if name == "invert":
        return 255 - image
    if name == "canny":
        edges = cv2.Canny(image, low, high)
        return np.stack([edges] * 3, axis=2)
    raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")


def control_map(image: Image.Image, width: int, height: int, name: str = "none", low: int = CANNY_LOW,
                high: int = CANNY_HIGH) -> np.ndarray:
    """The map the ControlNet gets, H x W x 3 uint8: ``image`` cropped and resized, then preprocessed."""
    rgb = np.asarray(image.convert("RGB"))
    return preprocess(crop_and_resize(rgb, width, height), name, low, high)


def hint_tensor(control: np.ndarray) -> torch.Tensor:
    """An H x W x 3 uint8 map as the ControlNet's input, ``[1, 3, H, W]`` float32 in [0, 1]."""
    return torch.from_numpy(control.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()
