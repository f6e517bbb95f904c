"""The hires fix through optimized_txt2img.py: the picture at the target size, the webui's metadata fields (read
back by the webui's own parser), grids carrying them, ``--from_png`` replaying ours and a webui infotext, the
Lanczos path, and bad hires flags as one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from optimizedSD import optimized_txt2img
from optimizedSD.arguments import parse_args
from tests.conftest import TINY_CONFIG
from tests.test_cli_errors import expect_usage_error
from tests.test_infotext import webui_parse_generation_parameters, webui_read_info_from_image

COMMON = ["--config", str(TINY_CONFIG), "--device", "cpu", "--no-watermark", "--H", "64", "--W", "64",
          "--ddim_steps", "4", "--scale", "5", "--prompt", "a castle", "--negative_prompt", "fog"]


def images(folder):
    return sorted(p for p in folder.rglob("seed_*") if p.is_file())


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_hires_run_writes_the_target_size_and_the_webuis_fields(tiny_checkpoint, tmp_path):
    out = tmp_path / "first"
    assert optimized_txt2img.main(["--ckpt", str(tiny_checkpoint), *COMMON, "--outdir", str(out), "--n_samples", "1",
                                   "--n_iter", "2", "--seed", "11", "--sampler", "dpmpp_2m", "--hires_scale", "2", "--hires_steps", "3",
                                   "--hires_strength", "0.6", "--hires_upscaler", "Latent (bicubic)",
                                   "--hires_sampler", "euler_a", "--hires_prompt", "a tall castle"]) == 0
    written = images(out)
    assert len(written) == 2
    with Image.open(written[0]) as image:
        assert image.size == (128, 128)
        fields = webui_parse_generation_parameters(webui_read_info_from_image(image))
    assert {k: fields[k] for k in ("Size", "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler",
                                   "Hires sampler", "Hires prompt", "Sampler")} == {
        "Size": "64x64", "Denoising strength": "0.6", "Hires upscale": "2", "Hires steps": "3",
        "Hires upscaler": "Latent (bicubic)", "Hires sampler": "Euler a", "Hires prompt": "a tall castle",
        "Sampler": "DPM++ 2M"}
    assert fields["Hires schedule type"] == "Uniform"  # Euler a's own, not the first pass's Karras
    assert "Hires negative prompt" not in fields
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size[1] >= 2 * 128  # two batches of one 128 px image
        assert "Hires upscale: 2" in webui_read_info_from_image(grid)

    again = tmp_path / "again"
    assert optimized_txt2img.main(["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
                                   "--no-watermark", "--n_samples", "1", "--skip_grid", "--outdir", str(again),
                                   "--from_png", str(written[1])]) == 0
    (replayed,) = images(again)
    assert np.abs(pixels(replayed) - pixels(written[1])).max() <= 1


WEBUI_INFOTEXT = ("a castle\nNegative prompt: fog\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, "
                  "Seed: 11, Size: 64x64, Model hash: 0123456789, Model: tiny, Denoising strength: 0.55, "
                  "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (antialiased), Version: v1.10.1")


def test_from_png_of_a_webui_hires_infotext(tiny_checkpoint, tmp_path):
    source = tmp_path / "webui.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", WEBUI_INFOTEXT)
    Image.new("RGB", (128, 128)).save(source, pnginfo=info)
    request = parse_args(["--ckpt", str(tiny_checkpoint), "--from_png", str(source)], "txt2img")
    hires = request.hires
    assert (hires.scale, hires.steps, hires.strength, hires.upscaler, hires.sampler) == (
        2.0, 2, 0.55, "latent-antialiased", None)
    assert (request.rng, request.sampler, request.schedule) == ("gpu", "dpmpp_2m", "karras")  # no RNG field: GPU

    replay, flags = tmp_path / "replay", tmp_path / "flags"
    assert optimized_txt2img.main(["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
                                   "--no-watermark", "--n_samples", "1", "--skip_grid", "--outdir", str(replay),
                                   "--from_png", str(source)]) == 0
    assert optimized_txt2img.main(["--ckpt", str(tiny_checkpoint), *COMMON, "--n_samples", "1", "--skip_grid",
                                   "--outdir", str(flags), "--seed", "11", "--sampler", "DPM++ 2M Karras",
                                   "--rng", "gpu", "--hires_scale", "2", "--hires_steps", "2",
                                   "--hires_strength", "0.55", "--hires_upscaler", "latent-antialiased"]) == 0
    (a,), (b,) = images(replay), images(flags)
    assert pixels(a).shape == (128, 128, 3)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


@pytest.mark.parametrize("upscaler, label", [("lanczos", "Lanczos"),
                                            pytest.param("nearest", "Nearest", marks=pytest.mark.slow)])
def test_pixel_upscalers_run_at_the_right_size(tiny_checkpoint, tmp_path, upscaler, label):
    out = tmp_path / upscaler
    assert optimized_txt2img.main(["--ckpt", str(tiny_checkpoint), *COMMON, "--n_samples", "1", "--skip_grid",
                                   "--outdir", str(out), "--seed", "3", "--sampler", "euler",
                                   "--hires_resize", "128x0", "--hires_upscaler", upscaler]) == 0
    (path,) = images(out)
    with Image.open(path) as image:
        assert image.size == (128, 128)
        fields = webui_parse_generation_parameters(webui_read_info_from_image(image))
    assert (fields["Hires upscaler"], fields["Hires resize"], fields["Denoising strength"]) == (label, "128x0", "0.7")


@pytest.mark.parametrize("argv, fragment", [
    (["--hires_scale", "1.3"], "must be a positive multiple of 64"),  # 64 px x 1.3 = 83 px
    (["--hires_steps", "3"], "--hires_steps goes with --hires_scale"),
    (["--hires_scale", "2", "--hires_strength", "0"], "--hires_strength must be above 0"),
    (["--hires_scale", "2", "--hires_upscaler", "ESRGAN"], "unknown --hires_upscaler"),
    (["--hires_scale", "2", "--hires_resize", "1024x0"], "not both"),
    (["--hires_resize", "0x0"], "at most one of them 0"),
    (["--hires_scale", "2", "--hires_sampler", "nope"], "unknown --hires_sampler"),
])
def test_bad_hires_flags_are_one_line(tiny_checkpoint, tmp_path, capsys, argv, fragment):
    expect_usage_error(capsys, optimized_txt2img.main, ["--ckpt", str(tiny_checkpoint), *COMMON, "--outdir",
                                                        str(tmp_path), *argv], fragment)
