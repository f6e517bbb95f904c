"""Output naming, 8-bit conversion, A1111 metadata, model hash, grid and watermark."""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.hashes import model_hash
from optimizedSD.infotext import read_parameters
from optimizedSD.outputs import (
    SampleWriter,
    Watermarker,
    infotext,
    make_grid,
    prompt_folder_name,
    read_watermark,
    to_uint8,
)

WINDOWS_FORBIDDEN = set('<>:"/\\|?*') | {chr(c) for c in range(32)}


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat on a mat",
        "../../etc/passwd",
        "C:\\Windows\\system32",
        'what? <b>"quoted"</b> | pipe * star',
        "ends with dots...",
        "ends with spaces   ",
        "...",
        "",
        "   ",
        "con",
        "NUL.txt",
        "x" * 300,
        "tab\tnew\nline",
        "tabby cat:0.25 white duck:0.75 hybrid",
        "émoji 🐱 ünïcode",
    ],
)
def test_prompt_folder_name_is_safe(prompt):
    name = prompt_folder_name(prompt)
    assert name and len(name) <= 100
    assert not (set(name) & WINDOWS_FORBIDDEN)
    assert not name.endswith((".", " "))
    assert name not in (".", "..")
    assert name.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "COM1", "LPT1"}


def test_prompt_folder_name_follows_the_fork():
    # the fork: "_".join(re.split(":| ", prompt))
    assert prompt_folder_name("tabby cat:0.25 white duck") == "tabby_cat_0.25_white_duck"


def test_to_uint8_rounds_like_diffusers():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.5, -2.0]).reshape(1, 1, 1, 8).expand(1, 3, 1, 8)
    out = to_uint8(x)
    assert out.shape == (1, 1, 8, 3) and out.dtype == np.uint8
    # diffusers VaeImageProcessor: (x / 2 + 0.5).clamp(0, 1) * 255, .round()
    expected = np.round(np.clip(x[0, 0, 0].numpy() / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[0, 0, :, 0], expected)
    assert out[0, 0, 2, 0] == 128  # CompVis' truncation would give 127


def test_infotext_matches_a1111_format():
    text = infotext("a cat", "", steps=50, sampler="ddim", scale=7.5, seed=27, width=512, height=512,
                    model_hash="abcdef1234")
    assert text == ("a cat\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 27, Size: 512x512, Model hash: abcdef1234, "
                    "RNG: CPU, Version: optimizedSD 0.1.0")
    text = infotext("a cat", "blurry, ugly", steps=20, sampler="euler_a", scale=7, seed=1, width=768,
                    height=512, model_hash="0123456789", model_name="sd-v1-4", strength=0.75)
    assert text == (
        "a cat\nNegative prompt: blurry, ugly\nSteps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.0, "
        "Seed: 1, Size: 768x512, Model hash: 0123456789, Model: sd-v1-4, Denoising strength: 0.75, RNG: CPU, "
        "Version: optimizedSD 0.1.0"
    )
    # A1111 quotes values that hold a comma, colon or newline
    assert 'Model: "a,b"' in infotext("p", "", steps=1, sampler="ddim", scale=1, seed=0, width=64, height=64,
                                      model_hash=None, model_name="a,b")


def test_infotext_parses_with_a1111_rules():
    """The parameters line splits back into key/value pairs with A1111's regex (infotext_utils.re_param)."""
    import re

    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    text = infotext("tabby cat:0.25 white duck:0.75", "dark", steps=3, sampler="dpm2_a", scale=7.5, seed=99,
                    schedule="uniform", width=64, height=128, model_hash="abcdef1234", eta=0.5)
    prompt, negative, params = text.split("\n")
    assert prompt == "tabby cat:0.25 white duck:0.75" and negative == "Negative prompt: dark"
    parsed = {k: v for k, v in re_param.findall(params)}
    assert parsed == {"Steps": "3", "Sampler": "DPM2 a", "Schedule type": "Uniform", "CFG scale": "7.5", "Seed": "99",
                      "Size": "64x128", "Model hash": "abcdef1234", "Eta DDIM": "0.5", "RNG": "CPU",
                      "Version": "optimizedSD 0.1.0"}


def test_model_hash_is_a1111_shorthash(tmp_path):
    path = tmp_path / "m.ckpt"
    data = os.urandom(5 << 20)
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]


def test_make_grid_matches_torchvision_layout():
    images = [np.full((4, 6, 3), i * 40, np.uint8) for i in range(5)]
    grid = make_grid(images, per_row=2)
    # torchvision.utils.make_grid(nrow=2, padding=2): 3 rows x 2 cols of (4+2)x(6+2) cells + 2 px border
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    assert (grid[2:6, 2:8] == 0).all() and (grid[2:6, 10:16] == 40).all()
    assert (grid[14:18, 2:8] == 160).all() and (grid[14:18, 10:16] == 0).all()  # last cell empty
    assert (grid[0:2] == 0).all()


def _natural_image(size=256):
    """A mid-grey picture with soft stripes: dwtDct decodes reliably on such images (it does not on noise,
    nor near black or white, where the embedding is clipped away)."""
    x = np.mgrid[0:size, 0:size][1] / size
    rgb = np.full((size, size, 3), 128.0) + 20 * np.sin(8 * x)[..., None]
    return rgb.clip(0, 255).astype(np.uint8)


def test_watermark_is_invisible_and_decodes():
    image = _natural_image()
    marked = Watermarker()(image)
    assert read_watermark(marked) == b"StableDiffusionV1"
    assert np.abs(marked.astype(int) - image.astype(int)).mean() < 3


def test_small_images_are_not_watermarked(caplog):
    image = np.zeros((64, 64, 3), np.uint8)
    watermark = Watermarker()
    assert watermark(image) is image
    assert "not watermarked" in caplog.text


def test_writer_never_overwrites(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    writer = SampleWriter(tmp_path, "png")
    first = [writer.write_sample("a_cat", 27 + i, image, "a cat\nSeed: 27") for i in range(2)]
    assert [p.name for p in first] == ["seed_27_00000.png", "seed_28_00001.png"]
    (tmp_path / "a_cat" / "seed_5_00007.png").write_bytes(b"someone else's file")
    second = SampleWriter(tmp_path, "png").write_sample("a_cat", 27, image, None)
    assert second.name == "seed_27_00008.png"
    assert (tmp_path / "a_cat" / "seed_5_00007.png").read_bytes() == b"someone else's file"
    assert read_parameters(first[0]) == "a cat\nSeed: 27"


def test_writers_racing_for_the_same_folder(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    paths, lock = [], threading.Lock()

    def run():
        writer = SampleWriter(tmp_path, "png")
        for _ in range(5):
            path = writer.write_sample("p", 1, image, None)
            with lock:
                paths.append(path)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 15 and len(list((tmp_path / "p").iterdir())) == 15


def test_jpeg_carries_parameters_as_exif(tmp_path):
    image = np.full((16, 16, 3), 100, np.uint8)
    path = SampleWriter(tmp_path, "jpg").write_sample("p", 3, image, "a cat, ünïcode\nSteps: 2")
    assert path.name == "seed_3_00000.jpg"
    with Image.open(path) as im:
        assert im.format == "JPEG"
    assert read_parameters(path) == "a cat, ünïcode\nSteps: 2"


def test_grid_counter_continues(tmp_path):
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    writer = SampleWriter(tmp_path, "png")
    assert writer.write_grid(images, 2, None).name == "grid-0000.png"
    assert writer.write_grid(images, 2, None).name == "grid-0001.png"
    with Image.open(tmp_path / "grid-0000.png") as grid:
        assert grid.size == (2 * 10 + 2, 2 * 10 + 2)


def test_unwritable_outdir_is_an_output_error(tmp_path):
    from optimizedSD.outputs import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError):
        SampleWriter(blocker / "out").prepare(".")
