"""ldm/pipeline/masks.py: reading the mask (modes, alpha, invert, blur, resize), its errors, and the overlay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.errors import UsageError
from ldm.pipeline.masks import apply_overlay, init_pixels, load_mask, mask_tensor


def _rect_mask(value: int = 255, background: int = 0, size=(32, 16)) -> np.ndarray:
    array = np.full((size[1], size[0]), background, np.uint8)
    array[4:12, 8:20] = value
    return array


def test_white_is_repaint_black_is_keep(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(_rect_mask()).save(path)
    mask = load_mask(path, 32, 16)
    assert mask.dtype == np.float32 and mask.shape == (16, 32)
    assert mask[4:12, 8:20].min() == 1 and mask.sum() == 8 * 12
    inverted = load_mask(path, 32, 16, invert=True)
    np.testing.assert_array_equal(inverted, 1 - mask)
    assert mask_tensor(mask).shape == (1, 1, 16, 32)


def test_any_mode_and_resized_to_the_image(tmp_path):
    rgb = tmp_path / "mask.jpg"
    Image.fromarray(_rect_mask()).convert("RGB").resize((64, 32), Image.NEAREST).save(rgb, quality=100)
    mask = load_mask(rgb, 32, 16)  # resized down with LANCZOS: the rectangle's inside stays white
    assert mask.shape == (16, 32) and mask[6:10, 10:18].min() > 0.9 and mask[0:2].max() < 0.1
    bilevel = tmp_path / "mask.bmp"
    Image.fromarray(_rect_mask()).convert("1").save(bilevel)
    np.testing.assert_array_equal(load_mask(bilevel, 32, 16), _rect_mask() / 255.0)
    sixteen = tmp_path / "mask16.png"
    Image.fromarray((_rect_mask().astype(np.uint16) * 257)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    np.testing.assert_array_equal(load_mask(sixteen, 32, 16), _rect_mask() / 255.0)


def test_rgba_uses_alpha_when_the_colour_is_uniform_else_luminance(tmp_path):
    alpha_only = np.zeros((16, 32, 4), np.uint8)
    alpha_only[..., :3] = 255  # white everywhere; the strokes are in the alpha channel
    alpha_only[..., 3] = _rect_mask()
    path = tmp_path / "alpha.png"
    Image.fromarray(alpha_only, "RGBA").save(path)
    np.testing.assert_array_equal(load_mask(path, 32, 16), _rect_mask() / 255.0)

    painted = np.zeros((16, 32, 4), np.uint8)
    painted[..., :3] = _rect_mask()[..., None]  # white strokes on black, alpha all opaque except a corner
    painted[..., 3] = 255
    painted[0:2, 0:2, 3] = 0
    path = tmp_path / "painted.png"
    Image.fromarray(painted, "RGBA").save(path)
    np.testing.assert_array_equal(load_mask(path, 32, 16), _rect_mask() / 255.0)

    palette = Image.fromarray(_rect_mask(1, 0)).convert("P")
    palette.putpalette([0, 0, 0, 0, 0, 0] + [0, 0, 0] * 254)  # both entries black ...
    palette.info["transparency"] = bytes([0, 255])  # ... entry 0 transparent, 1 opaque
    path = tmp_path / "palette.png"
    palette.save(path, transparency=bytes([0, 255]))
    np.testing.assert_array_equal(load_mask(path, 32, 16), _rect_mask() / 255.0)


def test_blur_is_pillows_gaussian_of_the_inverted_mask(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(_rect_mask(0, 255)).save(path)  # black rectangle on white: invert to repaint the rectangle
    blurred = load_mask(path, 32, 16, invert=True, blur=2)
    expected = Image.fromarray(_rect_mask()).filter(ImageFilter.GaussianBlur(2))
    np.testing.assert_array_equal(blurred, np.asarray(expected, np.float32) / 255.0)
    assert 0 < blurred[4, 7] < 1  # soft edge
    assert blurred[8, 14] > 0.9 and blurred[:, 30:].max() == 0  # far from the rectangle: exactly 0


@pytest.mark.parametrize("content, message", [
    (None, "mask not found"),
    (b"not an image", "cannot read mask"),
    ("black", "has nothing to repaint"),
])
def test_bad_masks_are_one_line_usage_errors(tmp_path, content, message):
    path = tmp_path / "mask.png"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "black":
        Image.new("L", (32, 16), 0).save(path)
    with pytest.raises(UsageError, match=message) as error:
        load_mask(path, 32, 16)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_nothing_to_repaint_after_invert_or_blur(tmp_path):
    white = tmp_path / "white.png"
    Image.new("L", (32, 16), 255).save(white)
    with pytest.raises(UsageError, match="after --invert_mask"):
        load_mask(white, 32, 16, invert=True)
    dot = tmp_path / "dot.png"
    array = np.zeros((16, 32), np.uint8)
    array[8, 16] = 255
    Image.fromarray(array).save(dot)
    assert load_mask(dot, 32, 16).sum() == 1
    with pytest.raises(UsageError, match="and --mask_blur"):  # a one-pixel stroke blurred below one half
        load_mask(dot, 32, 16, blur=4)
    with pytest.raises(UsageError, match="--mask_blur must be >= 0"):
        load_mask(dot, 32, 16, blur=-1)


def test_overlay_keeps_init_pixels_exactly_where_the_mask_is_zero():
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    decoded = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    mask = np.asarray(Image.fromarray(_rect_mask()).filter(ImageFilter.GaussianBlur(2)), np.float32) / 255
    out = apply_overlay(decoded, init, mask)
    np.testing.assert_array_equal(out[mask == 0], init[mask == 0])
    np.testing.assert_array_equal(out[mask == 1], decoded[mask == 1])
    edge = (mask > 0) & (mask < 1)
    assert edge.any()
    expected = np.round(init[edge] * (1 - mask[edge, None]) + decoded[edge] * mask[edge, None])
    np.testing.assert_allclose(out[edge], expected, atol=1)
    image = Image.fromarray(init).resize((64, 32))
    assert init_pixels(image, 32, 16).shape == (16, 32, 3)
    with pytest.raises(ValueError, match="sizes differ"):
        apply_overlay(decoded, init[:8], mask)
