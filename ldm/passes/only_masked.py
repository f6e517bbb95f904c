"""Inpainting's "Inpaint area" and "Masked content", as AUTOMATIC1111's webui v1.10 (``modules/processing.py``
``StableDiffusionProcessingImg2Img.init``, ``apply_overlay``/``uncrop``; ``modules/masking.py``).

``only_masked``: the mask (at the init image's own size, inverted and blurred) gives the box around its non-zero
pixels plus ``padding`` px, grown to the run's ``W : H`` aspect (:mod:`ldm.passes.crop_box`); that part of the
image and of the mask is resized to ``W x H`` (Lanczos, the webui's resize-and-fill) and inpainted as any
inpainting run is; the result is resized back to the box (resize-and-crop) and laid over the original through the
blurred mask, ``original * (1 - m) + result * m`` inside the box, the original as it is outside it. So a 4000x3000
photo is repainted in the memory of a ``W x H`` run: only the ``W x H`` crop meets the GPU.

``masked_content`` (the webui's "Masked content"): ``original`` starts from the image; ``fill`` first paints the
masked part with the blurred colours around it (``masking.fill``); ``latent_noise`` and ``latent_nothing`` fill
too (as the webui does for every choice but ``original``), then replace the masked part of the init latent by the
image's start noise (the webui's ``create_random_tensors`` of the same seeds: the same draw) or by zeros.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ldm.passes.crop_box import Box, crop_region, expand_crop_region, resize_and_crop, resize_and_fill
from ldm.pipeline.batches import BatchStart
from ldm.pipeline.inpaint_inputs import InpaintingInputs
from ldm.pipeline.inpainting import latent_mask
from ldm.pipeline.masks import init_pixels, load_mask, mask_tensor

AREAS = ("whole", "only_masked")
CONTENTS = ("original", "fill", "latent_noise", "latent_nothing")
_CONTENT_LABELS = {"original": "original", "fill": "fill", "latent_noise": "latent noise",
                   "latent_nothing": "latent nothing"}


def fill_masked(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The webui's ``masking.fill``: the masked part painted with ever less blurred copies of the kept part."""
    image = Image.fromarray(pixels)
    keep = ImageOps.invert(Image.fromarray(np.round(mask * 255).astype(np.uint8), "L"))
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return np.asarray(filled.convert("RGB"), dtype=np.uint8)


class AreaInpaintingInputs(InpaintingInputs):
    """:class:`~ldm.pipeline.inpaint_inputs.InpaintingInputs` with the webui's inpaint area and masked content."""

    def __init__(self, pixels, mask, *, blur, overlay, content="original", padding=32, area="whole",
                 original: np.ndarray | None = None, full_mask: np.ndarray | None = None, box: Box | None = None):
        super().__init__(pixels, mask, blur=blur, overlay=overlay)
        self.content, self.padding, self.area = content, padding, area
        self.original, self.full_mask, self.box = original, full_mask, box  # only_masked: the whole picture

    @classmethod
    def prepare_area(cls, init_image: Image.Image, options, width: int, height: int) -> "AreaInpaintingInputs":
        """The run's inputs for ``options`` (:class:`~ldm.pipeline.request.MaskOptions`) at ``width x height``."""
        if options.area == "whole":
            mask = load_mask(options.path, width, height, invert=options.invert, blur=options.blur)
            return cls(init_pixels(init_image, width, height), mask, blur=options.blur, overlay=options.overlay,
                       content=options.content, padding=options.padding)
        original = init_pixels(init_image, *init_image.size)
        full = load_mask(options.path, *init_image.size, invert=options.invert, blur=options.blur)
        levels = np.round(full * 255).astype(np.uint8)  # the blurred mask as the webui's 8-bit one
        box = expand_crop_region(crop_region(levels, options.padding), width, height, *init_image.size)
        pixels = np.asarray(resize_and_fill(Image.fromarray(original).crop(box), width, height))
        mask = np.asarray(resize_and_fill(Image.fromarray(levels, "L").crop(box), width, height), np.float32) / 255
        return cls(pixels, mask, blur=options.blur, overlay=options.overlay, content=options.content,
                   padding=options.padding, area=options.area, original=original, full_mask=full, box=box)

    @torch.no_grad()
    def encode(self, encode_images, *, nine_channel: bool, needs_init: bool) -> None:
        if self.content == "original":
            return super().encode(encode_images, nine_channel=nine_channel, needs_init=needs_init)
        pixels, self.pixels = self.pixels, fill_masked(self.pixels, self.mask)
        try:
            super().encode(encode_images, nine_channel=nine_channel, needs_init=needs_init)
        finally:
            self.pixels = pixels  # the overlay lays back the image as given

    def start(self, noise, x_T, scale_factor, **walk) -> BatchStart:
        start = super().start(noise, x_T, scale_factor, **walk)
        if start.init_latent is None or self.content not in ("latent_noise", "latent_nothing"):
            return start
        m = latent_mask(mask_tensor(self.mask)).to(x_T.device)
        replaced = x_T.float() if self.content == "latent_noise" else torch.zeros_like(start.init_latent)
        start.init_latent.mul_(1 - m).add_(replaced * m)  # in place: the blend holds the same tensor
        return start

    def finish(self, image: np.ndarray) -> np.ndarray:
        """One decoded ``W x H`` image: overlaid (whole), or resized back into its box of the whole picture and laid
        over it through the blurred mask (only masked; with ``no_overlay``, the box's pixels replaced whole)."""
        if self.area == "whole":
            return super().finish(image)
        return paste_back(self.original, self.full_mask, image, self.box, self.overlay)

    def metadata(self) -> dict[str, str]:
        """The webui's fields: ``Mask blur``, and where not the default ``Inpaint area``, ``Masked area padding``,
        ``Masked content``."""
        fields = super().metadata()
        if self.area == "only_masked":
            fields.update({"Inpaint area": "Only masked", "Masked area padding": str(self.padding)})
        if self.content != "original":
            fields["Masked content"] = _CONTENT_LABELS[self.content]
        return fields


def paste_back(original: np.ndarray, mask: np.ndarray, image: np.ndarray, box: Box, overlay: bool) -> np.ndarray:
    """``image`` resized into ``box`` of ``original`` (the webui's ``uncrop``), then composited through ``mask``:
    outside the box, and wherever the mask is 0, the original's pixels exactly."""
    x1, y1, x2, y2 = box
    out = original.copy()
    patch = np.asarray(resize_and_crop(Image.fromarray(image), x2 - x1, y2 - y1), dtype=np.float64)
    if not overlay:
        out[y1:y2, x1:x2] = patch.astype(np.uint8)
        return out
    m = mask[y1:y2, x1:x2, None].astype(np.float64)
    blended = original[y1:y2, x1:x2].astype(np.float64) * (1 - m) + patch * m
    out[y1:y2, x1:x2] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out
