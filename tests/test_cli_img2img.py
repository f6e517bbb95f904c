"""End to end: optimizedSD/optimized_img2img.py on a tiny random checkpoint (64x64 images, 2 steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from optimizedSD import optimized_img2img, optimized_txt2img
from optimizedSD.arguments import SAMPLERS
from optimizedSD.infotext import read_parameters

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


def common(ckpt: Path, outdir: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--ddim_steps", "2", "--n_samples", "1", "--seed", "3", "--prompt", "a tiny test", "--sampler", "ddim"]


def run(ckpt: Path, outdir: Path, init: Path, *extra: str) -> int:
    return optimized_img2img.main([*common(ckpt, outdir), "--init-img", str(init), *extra])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def samples(outdir: Path) -> list[Path]:
    return sorted(p for p in outdir.rglob("seed_*") if p.is_file())


def make_image(path: Path, size=(64, 64), mode="RGB") -> Path:
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray((x % 2 * 255).astype(np.uint8)))
    elif mode == "P":
        image = image.quantize(16)
    elif mode == "L":
        image = image.convert("L")
    image.save(path)
    return path


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler(tiny_checkpoint, tmp_path, sampler):
    init = make_image(tmp_path / "init.png")
    assert run(tiny_checkpoint, tmp_path / "out", init, "--sampler", sampler, "--n_samples", "2",
               "--strength", "0.5", "--ddim_steps", "4") == 0
    files = samples(tmp_path / "out")
    assert [p.name for p in files] == ["seed_3_00000.png", "seed_4_00001.png"]
    text = read_parameters(files[1])
    assert text.startswith("a tiny test\nSteps: 4, Sampler: ") and text.endswith("Denoising strength: 0.5, RNG: CPU, Version: optimizedSD 0.1.0")
    assert "Seed: 4, Size: 64x64" in text
    assert pixels(files[0]).shape == (64, 64, 3)
    assert (tmp_path / "out" / "grid-0000.png").is_file()


@pytest.mark.parametrize(
    "size, mode, expected",
    [((64, 64), "RGBA", (64, 64)), ((100, 70), "P", (64, 64)), ((130, 70), "L", (128, 64))],
)
def test_any_image_and_default_size(tiny_checkpoint, tmp_path, size, mode, expected):
    init = make_image(tmp_path / ("init.png" if mode != "L" else "init.jpg"), size, mode)
    assert run(tiny_checkpoint, tmp_path / "out", init, "--skip_grid") == 0
    (path,) = samples(tmp_path / "out")
    with Image.open(path) as image:
        assert image.size == expected and image.mode == "RGB"
    assert f"Size: {expected[0]}x{expected[1]}" in read_parameters(path)


def test_explicit_size_resizes_the_init_image(tiny_checkpoint, tmp_path):
    init = make_image(tmp_path / "init.png", (64, 64))
    assert run(tiny_checkpoint, tmp_path / "out", init, "--W", "128", "--H", "64", "--skip_grid") == 0
    (path,) = samples(tmp_path / "out")
    with Image.open(path) as image:
        assert image.size == (128, 64)


def test_strength_zero_is_the_vae_round_trip(tiny_checkpoint, tmp_path):
    """Strength 0: no denoising step runs; the image is decode(encode(image)) with the seed's posterior sample."""
    from ldm.loading.stable_diffusion import load_stable_diffusion
    from ldm.samplers.noise import SeededNoise

    init = make_image(tmp_path / "init.png")
    assert run(tiny_checkpoint, tmp_path / "out", init, "--strength", "0", "--skip_grid") == 0
    (path,) = samples(tmp_path / "out")

    sd = load_stable_diffusion(tiny_checkpoint, TINY_CONFIG)
    x = torch.from_numpy(np.asarray(Image.open(init).convert("RGB"), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1).unsqueeze(0) * 2 - 1
    noise = SeededNoise([3])
    first = noise.initial((4, 8, 8))  # the start noise is drawn first, the posterior sample second
    with torch.no_grad():
        latent = sd.scale_factor * sd.vae.encode(x).sample(noise(first))
        decoded = sd.vae.decode(latent / sd.scale_factor)
    expected = ((decoded[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1) * 255).round().numpy().astype(np.int16)
    assert np.abs(pixels(path) - expected).max() <= 1


def test_strength_one_starts_from_pure_noise(tiny_checkpoint, tmp_path):
    """Strength 1 ignores the init image: deterministic DDIM gives txt2img's image for the same seed."""
    init = make_image(tmp_path / "init.png")
    assert run(tiny_checkpoint, tmp_path / "img", init, "--strength", "1", "--skip_grid") == 0
    other = make_image(tmp_path / "other.png", mode="L")
    assert run(tiny_checkpoint, tmp_path / "img_other", other, "--strength", "1", "--skip_grid") == 0
    assert optimized_txt2img.main([*common(tiny_checkpoint, tmp_path / "txt"), "--H", "64", "--W", "64",
                                   "--skip_grid"]) == 0
    (img,), (img_other,), (txt,) = samples(tmp_path / "img"), samples(tmp_path / "img_other"), samples(tmp_path / "txt")
    assert np.abs(pixels(img) - pixels(txt)).max() <= 1
    assert np.abs(pixels(img_other) - pixels(txt)).max() <= 1


def test_image_k_of_a_batch_is_a_single_run_with_seed_plus_k(tiny_checkpoint, tmp_path):
    init = make_image(tmp_path / "init.png")
    assert run(tiny_checkpoint, tmp_path / "batch", init, "--n_samples", "3", "--seed", "50", "--sampler",
               "euler_a", "--skip_grid") == 0
    assert run(tiny_checkpoint, tmp_path / "single", init, "--seed", "52", "--sampler", "euler_a",
               "--skip_grid") == 0
    (single,) = samples(tmp_path / "single")
    (in_batch,) = [p for p in samples(tmp_path / "batch") if p.name.startswith("seed_52_")]
    assert np.abs(pixels(single) - pixels(in_batch)).max() <= 1
    # and the seeds differ: images 0 and 2 of the batch are not the same
    a, b = (pixels(p) for p in samples(tmp_path / "batch") if p.name.startswith(("seed_50_", "seed_52_")))
    assert np.abs(a - b).max() > 1
