"""Inpainting's "Only masked" area and "Masked content" (ldm/passes/only_masked.py, crop_box.py): the crop box and
its growth to the run's aspect against boxes computed by hand from the webui's ``get_crop_region`` /
``expand_crop_region``, the resizes, the fill; then optimized_inpaint.py on a 2000x1500 photo: the picture comes
back at its own size, every pixel the blurred mask does not touch exactly the input's, the webui's fields
written; and in the VRAM ledger the 2000x1500 run in low mode needs no more than a 512 px one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from ldm.ledger.calls import generation_calls
from ldm.ledger.plan import _meta_models
from ldm.ledger.shapes import RunShape
from ldm.ledger.simulation import simulate
from ldm.passes.crop_box import crop_region, expand_crop_region, resize_and_crop, resize_and_fill
from ldm.passes.only_masked import fill_masked
from ldm.pipeline.images import output_size
from ldm.pipeline.masks import load_mask
from ldm.pipeline.request import INPAINT
from optimizedSD import optimized_inpaint
from optimizedSD.arguments import parse_args
from tests.conftest import SD_V1_CONFIG, TINY_CONFIG
from tests.test_infotext import webui_parse_generation_parameters, webui_read_info_from_image


def rect_mask(width, height, x1, y1, x2, y2):
    mask = np.zeros((height, width), np.uint8)
    mask[y1:y2, x1:x2] = 255
    return mask


@pytest.mark.parametrize("mask_box, pad, expected", [
    ((40, 30, 50, 40), 0, (40, 30, 50, 40)),
    ((40, 30, 50, 40), 5, (35, 25, 55, 45)),
    ((2, 3, 50, 40), 5, (0, 0, 55, 45)),  # clipped at the image's edge
    ((90, 70, 100, 80), 8, (82, 62, 100, 80)),
])
def test_crop_region_is_the_masks_box_plus_padding(mask_box, pad, expected):
    assert crop_region(rect_mask(100, 80, *mask_box), pad) == expected


@pytest.mark.parametrize("box, size, image, expected", [
    ((100, 100, 228, 132), (512, 512), (1000, 1000), (100, 52, 228, 180)),  # 128x32 -> 128x128 about the centre
    ((0, 0, 128, 32), (512, 512), (1000, 1000), (0, 0, 128, 128)),  # pushed down from the top edge
    ((10, 140, 138, 150), (512, 512), (1000, 150), (10, 22, 138, 150)),  # pushed up from the bottom edge
    ((0, 0, 400, 10), (512, 512), (400, 100), (0, 0, 400, 100)),  # taller than the image: clipped
    ((10, 10, 20, 30), (1024, 512), (1000, 1000), (0, 10, 40, 30)),  # 10x20 -> 40x20 for 2:1, pushed right
    ((10, 10, 40, 30), (512, 768), (1000, 1000), (10, 0, 40, 45)),  # 30x20 -> 30x45 for 2:3 (int of 45)
])
def test_expand_crop_region_grows_to_the_runs_aspect(box, size, image, expected):
    assert expand_crop_region(box, *size, *image) == expected


def test_resizes_keep_the_size_asked_and_the_picture_centred():
    stripes = np.zeros((50, 100, 3), np.uint8)
    stripes[:, :50] = (255, 0, 0)
    picture = Image.fromarray(stripes)
    filled = np.asarray(resize_and_fill(picture, 64, 64))
    assert filled.shape == (64, 64, 3)
    centre = np.asarray(picture.resize((64, 32), resample=Image.LANCZOS))
    assert np.array_equal(filled[16:48], centre)  # fitted, centred; the 16 rows above and below stretch its edges
    assert np.abs(filled[:16].astype(int) - centre[:1].astype(int)).max() <= 2
    cropped = np.asarray(resize_and_crop(picture, 64, 64))
    assert cropped.shape == (64, 64, 3)
    assert np.array_equal(cropped, np.asarray(picture.resize((128, 64), resample=Image.LANCZOS))[:, 32:96])


def test_fill_paints_the_masked_part_from_its_surroundings():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (200, 40, 40)
    pixels[20:40, 8:24] = (0, 255, 0)  # the part to repaint, inside the red half
    mask = np.zeros((64, 64), np.float32)
    mask[20:40, 8:24] = 1
    filled = fill_masked(pixels, mask)
    assert np.array_equal(filled[mask == 0], pixels[mask == 0])
    inside = filled[20:40, 8:24].reshape(-1, 3).mean(0)
    assert inside[0] > 120 and inside[1] < 60  # red from around it, none of the green left


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photo")
    rng = np.random.default_rng(0)
    picture = (rng.random((1500, 2000, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "photo.png")
    Image.fromarray(rect_mask(2000, 1500, 1500, 300, 1600, 360)).save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png", picture


def test_only_masked_repaints_the_box_and_keeps_every_other_pixel(tiny_checkpoint, photo, tmp_path):
    image_path, mask_path, picture = photo
    out = tmp_path / "out"
    assert optimized_inpaint.main([
        "--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--no-watermark",
        "--init-img", str(image_path), "--mask", str(mask_path), "--inpaint_area", "only_masked", "--H", "128",
        "--W", "128", "--strength", "0.8", "--sampler", "ddim", "--ddim_steps", "3", "--n_samples", "1",
        "--seed", "4", "--skip_grid", "--outdir", str(out), "--prompt", "a window",
        "--masked_content", "latent_nothing"]) == 0
    (path,) = [p for p in out.rglob("seed_*") if p.is_file()]
    with Image.open(path) as image:
        result = np.asarray(image.convert("RGB"))
        fields = webui_parse_generation_parameters(webui_read_info_from_image(image))
    assert result.shape == picture.shape
    reach = load_mask(mask_path, 2000, 1500, blur=4) > 0  # the blurred mask's reach (Gaussian, 4 px)
    assert np.array_equal(result[~reach], picture[~reach])  # outside the pasted region: the input, exactly
    changed = np.any(result != picture, axis=2)
    assert changed[300:360, 1500:1600].mean() > 0.9  # the masked part is repainted
    assert {k: fields[k] for k in ("Inpaint area", "Masked area padding", "Masked content", "Size", "Mask blur")} == {
        "Inpaint area": "Only masked", "Masked area padding": "32", "Masked content": "latent nothing",
        "Size": "128x128", "Mask blur": "4"}


def test_only_masked_2000x1500_in_low_mode_needs_no_more_than_a_512px_run(photo, tmp_path):
    image_path, mask_path, _ = photo
    small = tmp_path / "small.png"
    Image.new("RGB", (512, 512)).save(small)

    def low_peak(init, *extra):
        request = parse_args(["--config", str(SD_V1_CONFIG), "--ckpt", "none.ckpt", "--device", "cpu", "--plan",
                              "--init-img", str(init), "--mask", str(mask_path), "--n_samples", "1",
                              "--ddim_steps", "2", *extra], INPAINT)
        with Image.open(init) as opened:
            image = opened.convert("RGB")
        height, width = output_size(request, image)  # the size the run samples at, as --plan takes it
        assert (height, width) == (512, 512)
        shape = RunShape(height, width, 1, request.sampler, 2, request.scale, "sdpa", True, None, True)
        calls = generation_calls(request, [request.prompt], image)
        return simulate(_meta_models(str(SD_V1_CONFIG), torch.float16), "low", shape, calls=calls).peak_bytes

    assert low_peak(image_path, "--inpaint_area", "only_masked") <= low_peak(small)


def test_from_png_restores_the_webuis_inpaint_area_fields(photo, tmp_path):
    image_path, mask_path, _ = photo
    source = tmp_path / "webui.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a window\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 512x512, "
                  "Denoising strength: 0.6, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 16, "
                  "Masked content: latent noise, Version: v1.10.1")
    Image.new("RGB", (64, 64)).save(source, pnginfo=info)
    request = parse_args(["--ckpt", "none.ckpt", "--init-img", str(image_path), "--mask", str(mask_path),
                          "--from_png", str(source)], INPAINT)
    assert (request.mask.area, request.mask.padding, request.mask.content) == ("only_masked", 16, "latent_noise")
    assert (request.width, request.height) == (512, 512)
