"""The hint: the webui extension's Crop and Resize, the weight-free preprocessors (OpenCV's Canny, invert), the
saved map; and ControlNets in img2img and inpainting (inpainting against diffusers'
``StableDiffusionControlNetInpaintPipeline`` on the same files, as tests/test_cli_inpaint.py does without one)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.control.hints import control_map, crop_and_resize, preprocess
from optimizedSD import optimized_img2img, optimized_inpaint, optimized_txt2img
from tests.control_files import diffusers_controlnet, hint_png, png_hint_tensor, random_control_state, save_v11
from tests.test_cli_inpaint import PROMPT, files as inpaint_files, pixels, samples  # noqa: F401 (a fixture)
from tests.test_cli_vs_diffusers import TINY_CONFIG, diffusers_pipeline_from_checkpoint


def picture(width: int, height: int, colours: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if colours is None:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    return palette[rng.integers(0, colours, (height, width))]


@pytest.mark.parametrize("size, colours, interpolation", [
    ((100, 60), None, cv2.INTER_CUBIC),  # grows: k = 64 / 60, to 107 x 64, then the centre 64 columns
    ((200, 150), None, cv2.INTER_AREA),  # shrinks: k = 64 / 150 ... max(64/150, 64/200) = 0.4267, to 85 x 64
    ((40, 90), 5, cv2.INTER_NEAREST),  # a segmentation-like map of 5 colours
])
def test_crop_and_resize_is_the_extensions(size, colours, interpolation):
    width, height = size
    image = picture(width, height, colours)
    k = max(64 / height, 64 / width)
    new_w, new_h = int(np.round(width * k)), int(np.round(height * k))
    scaled = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - 64) // 2, (new_w - 64) // 2
    np.testing.assert_array_equal(crop_and_resize(image, 64, 64), scaled[top:top + 64, left:left + 64])


def test_same_size_is_untouched_and_preprocessors():
    image = picture(64, 48, seed=1)
    np.testing.assert_array_equal(crop_and_resize(image, 64, 48), image)
    np.testing.assert_array_equal(preprocess(image, "invert"), 255 - image)
    edges = cv2.Canny(image, 50, 150)
    np.testing.assert_array_equal(preprocess(image, "canny", 50, 150), np.stack([edges] * 3, axis=2))
    assert control_map(Image.fromarray(image), 64, 48, "canny").shape == (48, 64, 3)


@pytest.fixture(scope="module")
def control_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control")
    state = random_control_state(TINY_CONFIG)
    return save_v11(state, folder / "control_v11p_sd15_canny.safetensors"), state


def txt2img(tiny_checkpoint, outdir: Path, *extra: str) -> list[Path]:
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--n_samples", "1", "--seed", "9", "--sampler", "dpmpp_2m", "--ddim_steps", "4",
            "--skip_grid", "--no-watermark", *extra]
    assert optimized_txt2img.main(argv) == 0
    return sorted(outdir.rglob("seed_*.png"))


@pytest.mark.parametrize("name", ["canny", pytest.param("invert", marks=pytest.mark.slow)])
def test_preprocessed_image_equals_its_map_given_as_the_hint(tmp_path, tiny_checkpoint, control_file, name):
    image = hint_png(tmp_path / "photo.png")
    with Image.open(image) as opened:
        rgb = np.asarray(opened.convert("RGB"))
    expected = np.stack([cv2.Canny(rgb, 100, 200)] * 3, axis=2) if name == "canny" else 255 - rgb
    Image.fromarray(expected).save(tmp_path / "map.png")
    model = str(control_file[0])
    made = txt2img(tiny_checkpoint, tmp_path / "made", "--control_model", model, "--control_image", str(image),
                   "--control_preprocess", name, "--save_control_map")
    given = txt2img(tiny_checkpoint, tmp_path / "given", "--control_model", model, "--control_image",
                    str(tmp_path / "map.png"))
    assert [p.name for p in made] == ["seed_9_00000-control0.png", "seed_9_00000.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(made[0])), expected)  # the saved map
    np.testing.assert_array_equal(np.asarray(Image.open(made[1])), np.asarray(Image.open(given[0])))


def test_img2img_with_a_controlnet(tmp_path, tiny_checkpoint, control_file):
    init = hint_png(tmp_path / "init.png", 128, 64, seed=5)  # the hint is made at the init image's size
    hint = hint_png(tmp_path / "hint.png", 50, 50, seed=6)

    def run(outdir, *extra):
        argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir",
                str(outdir), "--init-img", str(init), "--strength", "0.7", "--n_samples", "1", "--seed", "4",
                "--ddim_steps", "5", "--skip_grid", "--no-watermark", *extra]
        assert optimized_img2img.main(argv) == 0
        (path,) = outdir.rglob("seed_*.png")
        return np.asarray(Image.open(path)).astype(np.float64)

    flags = ["--control_model", str(control_file[0]), "--control_image", str(hint)]
    plain, steered = run(tmp_path / "plain"), run(tmp_path / "steered", *flags)
    assert steered.shape == (64, 128, 3)
    assert np.abs(steered - plain).mean() > 1


@pytest.mark.parametrize("kind", ["nine"])
def test_inpainting_equals_diffusers_controlnet_inpaint_pipeline(inpaint_files, control_file, tmp_path, kind):
    from diffusers import StableDiffusionControlNetInpaintPipeline

    hint = hint_png(tmp_path / "hint.png", seed=8)
    steps, scale, seed = 5, 7.5, 11
    ckpt, config, state = inpaint_files[kind]
    assert optimized_inpaint.main([
        "--ckpt", str(ckpt), "--config", str(config), "--device", "cpu", "--precision", "full", "--outdir",
        str(tmp_path / "out"), "--init-img", str(inpaint_files["init"]), "--mask", str(inpaint_files["mask"]),
        "--prompt", PROMPT, "--no-watermark", "--skip_grid", "--n_samples", "1", "--seed", str(seed), "--sampler",
        "ddim", "--ddim_steps", str(steps), "--scale", str(scale), "--no_overlay", "--mask_blur", "0",
        "--strength", "1", "--control_model", str(control_file[0]), "--control_image", str(hint),
        "--control_weight", "0.8"]) == 0
    (path,) = samples(tmp_path / "out")
    ours = pixels(path)
    base = diffusers_pipeline_from_checkpoint(state, config)
    pipe = StableDiffusionControlNetInpaintPipeline(**base.components, controlnet=diffusers_controlnet(
        control_file[1], TINY_CONFIG), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        theirs = pipe(PROMPT, image=Image.open(inpaint_files["init"]), mask_image=Image.open(inpaint_files["mask"]),
                      control_image=png_hint_tensor(hint), height=64, width=64, num_inference_steps=steps,
                      guidance_scale=scale, strength=1.0, eta=0.0, latents=latents, generator=generator,
                      controlnet_conditioning_scale=0.8, padding_mask_crop=None, output_type="np").images[0]
    theirs = np.round(theirs * 255)
    difference = np.abs(ours - theirs).mean()
    assert difference <= 1.0, difference
