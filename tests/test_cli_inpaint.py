"""End to end: optimizedSD/optimized_inpaint.py on tiny random checkpoints (4- and 9-channel UNets), against
diffusers' StableDiffusionInpaintPipeline, plus the overlay, every sampler, seeds, metadata and errors.

The diffusers comparison: ``--no_overlay --mask_blur 0``, fp32 CPU, DDIM with a step count dividing 1000,
strength 1; the pipeline gets ``padding_mask_crop=None``, the CLI's start noise as ``latents=`` (the first
draw of the seed's CPU generator) and that generator (already past that draw) for its VAE posterior samples:
the init image's (4 channels only), then the masked image's, the order the CLI draws them in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm.config import load_model_config
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_img2img, optimized_inpaint, optimized_txt2img
from optimizedSD.arguments import SAMPLERS
from optimizedSD.infotext import read_parameters
from tests.test_cli_vs_diffusers import TINY_CONFIG, diffusers_pipeline_from_checkpoint
from tests.test_inpainting_vs_diffusers import tiny_inpainting_config, write_test_images

PROMPT = "a red sofa in a white room"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The two tiny checkpoints (4 and 9 channels) with their configs, and an init image and a mask."""
    directory = tmp_path_factory.mktemp("inpaint")
    nine_config = tiny_inpainting_config(directory)
    four_state = random_state_dict(load_model_config(TINY_CONFIG), seed=2024)
    nine_state = random_state_dict(load_model_config(nine_config), seed=2025)
    init, mask = write_test_images(directory)
    return {
        "four": (save_checkpoint(four_state, directory / "plain.safetensors"), TINY_CONFIG, four_state),
        "nine": (save_checkpoint(nine_state, directory / "inpainting.ckpt"), nine_config, nine_state),
        "init": init, "mask": mask,
    }


def run(files, kind: str, outdir: Path, *extra: str) -> int:
    ckpt, config, _ = files[kind]
    return optimized_inpaint.main([
        "--ckpt", str(ckpt), "--config", str(config), "--device", "cpu", "--precision", "full", "--outdir", str(outdir),
        "--init-img", str(files["init"]), "--mask", str(files["mask"]), "--prompt", PROMPT, "--no-watermark",
        "--skip_grid", "--n_samples", "1", "--seed", "11", "--sampler", "ddim", "--ddim_steps", "4", *extra])


def samples(outdir: Path) -> list[Path]:
    return sorted(p for p in outdir.rglob("seed_*") if p.is_file())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64)


@pytest.mark.parametrize("kind", ["four", "nine"])
def test_cli_equals_diffusers_inpaint_pipeline(files, tmp_path, kind):
    from diffusers import StableDiffusionInpaintPipeline

    steps, scale, seed = 5, 7.5, 11
    assert run(files, kind, tmp_path, "--no_overlay", "--mask_blur", "0", "--strength", "1", "--ddim_steps", str(steps),
               "--scale", str(scale)) == 0
    (path,) = samples(tmp_path)
    ours = pixels(path)

    _, config, state = files[kind]
    base = diffusers_pipeline_from_checkpoint(state, config)
    pipe = StableDiffusionInpaintPipeline(**base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        theirs = pipe(PROMPT, image=Image.open(files["init"]), mask_image=Image.open(files["mask"]), height=64, width=64,
                      num_inference_steps=steps, guidance_scale=scale, strength=1.0, eta=0.0, latents=latents,
                      generator=generator, padding_mask_crop=None, output_type="np").images[0]
    theirs = np.round(theirs * 255)
    assert ours.shape == theirs.shape == (64, 64, 3) and ours.std() > 1
    difference = np.abs(ours - theirs).mean()
    print(f"{kind}: mean |CLI - diffusers| = {difference:.4f} levels")
    assert difference <= 1.0, difference  # the bound: one 8-bit level on average


@pytest.mark.parametrize("kind", ["four", "nine"])
def test_overlay_returns_the_init_pixels_where_the_blurred_mask_is_zero(files, tmp_path, kind):
    assert run(files, kind, tmp_path / "overlay", "--mask_blur", "3") == 0
    assert run(files, kind, tmp_path / "plain", "--mask_blur", "3", "--no_overlay") == 0
    (overlaid,), (plain,) = samples(tmp_path / "overlay"), samples(tmp_path / "plain")
    init = pixels(files["init"])
    with Image.open(files["mask"]) as mask_image:
        blurred = np.asarray(mask_image.convert("L").filter(ImageFilter.GaussianBlur(3)))
    kept, repainted = blurred == 0, blurred == 255
    assert kept.sum() > 1000 and repainted.sum() > 100
    out, decoded = pixels(overlaid), pixels(plain)
    np.testing.assert_array_equal(out[kept], init[kept])
    np.testing.assert_array_equal(out[repainted], decoded[repainted])
    assert np.abs(decoded[kept] - init[kept]).mean() > 1  # without the overlay the VAE round trip shows
    text = read_parameters(overlaid)
    assert "Mask blur: 3" in text and "Denoising strength: 1" in text


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler(files, tmp_path, sampler):
    kind = "nine" if sampler in ("euler_a", "dpmpp_2m", "plms", "dpm_fast", "dpm_adaptive") else "four"
    assert run(files, kind, tmp_path, "--sampler", sampler, "--n_samples", "2", "--ddim_steps", "3",
               "--strength", "0.8", "--mask_blur", "0") == 0
    first, second = samples(tmp_path)
    assert (first.name, second.name) == ("seed_11_00000.png", "seed_12_00001.png")
    init, a, b = pixels(files["init"]), pixels(first), pixels(second)
    with Image.open(files["mask"]) as mask_image:
        kept = np.asarray(mask_image.convert("L")) == 0
    np.testing.assert_array_equal(a[kept], init[kept])  # the overlay (no blur): the kept pixels exactly
    assert np.abs(a[~kept] - b[~kept]).mean() > 1  # two seeds, two pictures


@pytest.mark.parametrize("kind, sampler", [("four", "euler_a"), ("nine", "ddim")])
def test_seeds_are_per_image(files, tmp_path, kind, sampler):
    assert run(files, kind, tmp_path / "batch", "--sampler", sampler, "--n_samples", "2", "--ddim_steps", "3",
               "--strength", "0.8") == 0
    assert run(files, kind, tmp_path / "alone", "--sampler", sampler, "--seed", "12", "--ddim_steps", "3",
               "--strength", "0.8") == 0
    (alone,) = samples(tmp_path / "alone")
    assert np.abs(pixels(samples(tmp_path / "batch")[1]) - pixels(alone)).max() <= 1  # batched float rounding
    text = read_parameters(alone)
    assert "Denoising strength: 0.8" in text and "Mask blur: 4" in text and "Seed: 12" in text


@pytest.mark.parametrize("extra, message", [
    (["--mask", "missing.png"], "mask not found"),
    (["--invert_mask", "--mask", "WHITE"], "nothing to repaint"),
    (["--mask_blur", "-1"], "--mask_blur"),
])
def test_bad_masks_exit_2_with_one_line(files, tmp_path, capsys, extra, message):
    white = tmp_path / "white.png"
    Image.new("L", (64, 64), 255).save(white)
    extra = [str(tmp_path / e) if e == "missing.png" else str(white) if e == "WHITE" else e for e in extra]
    assert run(files, "four", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert samples(tmp_path / "out") == []


def test_dpm_adaptive_refuses_a_4_channel_checkpoint_in_one_line(files, tmp_path, capsys):
    assert run(files, "four", tmp_path / "out", "--sampler", "dpm_adaptive", "--ddim_steps", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "--sampler dpm_adaptive cannot inpaint with a 4-channel checkpoint" in err and len(err.splitlines()) == 1
    assert samples(tmp_path / "out") == []


@pytest.mark.parametrize("script", [optimized_txt2img, optimized_img2img])
def test_txt2img_and_img2img_refuse_an_inpainting_checkpoint(files, tmp_path, capsys, script):
    ckpt, config, _ = files["nine"]
    argv = ["--ckpt", str(ckpt), "--config", str(config), "--device", "cpu", "--outdir", str(tmp_path),
            "--n_samples", "1", "--ddim_steps", "2", "--H", "64", "--W", "64"]
    if script is optimized_img2img:
        argv += ["--init-img", str(files["init"])]
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "optimized_inpaint.py" in err and len(err.splitlines()) == 1
