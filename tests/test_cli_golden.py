"""The command line's images do not move when the code is reshaped: pixel hashes pinned from commit 011815f.

Each case runs one of the scripts on the tiny random checkpoint of ``conftest.py`` (fp32, CPU) and hashes
every image it writes (sha256 of the RGB pixels, in file-name order). The hashes in
``golden_cli_pixels.json`` were written by this file's ``__main__`` from the code as it was before the
code-shape refactor (issue 9), so a refactor that changes any pixel of any case fails here. A change that
is meant to change images (a sampler fix, another default) re-records them:
``python tests/test_cli_golden.py`` and says so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from optimizedSD import optimized_img2img, optimized_txt2img  # noqa: E402

GOLDEN = Path(__file__).with_name("golden_cli_pixels.json")
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"

COMMON = ["--config", str(TINY_CONFIG), "--device", "cpu", "--H", "64", "--W", "64", "--ddim_steps", "3",
          "--seed", "11", "--no-watermark", "--skip_grid"]
CASES = {
    "txt2img_plms_default": ("txt2img", ["--n_samples", "2", "--prompt", "a red fox"]),
    "txt2img_euler_a_negative": ("txt2img", ["--n_samples", "2", "--sampler", "euler_a", "--prompt", "a cat",
                                             "--negative_prompt", "blurry"]),
    "txt2img_weighted_dpm_solver": ("txt2img", ["--n_samples", "1", "--sampler", "dpm_solver",
                                                "--prompt", "tabby cat:0.25 white duck:0.75 hybrid"]),
    "txt2img_ddim_eta_fixed_code": ("txt2img", ["--n_samples", "2", "--n_iter", "2", "--sampler", "ddim",
                                                "--ddim_eta", "0.5", "--fixed_code", "--prompt", "hills"]),
    "txt2img_heun_low_unet_bs": ("txt2img", ["--n_samples", "2", "--sampler", "heun", "--vram", "low",
                                             "--unet_bs", "1", "--scale", "3.0", "--prompt", "a boat"]),
    "txt2img_lms_scale1_medium": ("txt2img", ["--n_samples", "1", "--sampler", "lms", "--vram", "medium",
                                              "--scale", "1.0", "--prompt", "a tree"]),
    "txt2img_dpm2_a_tiled": ("txt2img", ["--n_samples", "1", "--sampler", "dpm2_a", "--vae_tiling",
                                         "--prompt", "a road"]),
    "img2img_ddim": ("img2img", ["--n_samples", "2", "--strength", "0.6", "--prompt", "a house"]),
    "img2img_euler_strength1": ("img2img", ["--n_samples", "1", "--sampler", "euler", "--strength", "1.0",
                                            "--prompt", "a house"]),
}


def _init_image(path: Path) -> Path:
    y, x = np.mgrid[0:80, 0:72]
    rgb = np.stack([x * 3, y * 3, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def run_case(name: str, ckpt: Path, folder: Path) -> list[str]:
    """Run one case into ``folder`` and return the sha256 of each written image's pixels, by file name."""
    mode, extra = CASES[name]
    argv = ["--ckpt", str(ckpt), "--outdir", str(folder / "out"), *COMMON, *extra]
    if mode == "img2img":
        argv += ["--init-img", str(_init_image(folder / "init.png"))]
    main = optimized_txt2img.main if mode == "txt2img" else optimized_img2img.main
    assert main(argv) == 0
    paths = sorted(p for p in (folder / "out").rglob("seed_*") if p.is_file())
    assert paths
    hashes = []
    for path in paths:
        with Image.open(path) as image:
            hashes.append(hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest())
    return hashes


@pytest.mark.parametrize("name", sorted(CASES))
def test_images_equal_the_pinned_ones(tiny_checkpoint, tmp_path, name):
    golden = json.loads(GOLDEN.read_text())
    assert run_case(name, tiny_checkpoint, tmp_path) == golden[name]


if __name__ == "__main__":  # re-record (see the module docstring)
    import tempfile

    from ldm.config import load_model_config
    from ldm.loading.random_weights import random_state_dict, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        # The same weights as conftest's tiny_checkpoint fixture.
        ckpt = save_checkpoint(random_state_dict(load_model_config(TINY_CONFIG), seed=1234), Path(tmp) / "tiny.safetensors")
        result = {}
        for case in sorted(CASES):
            (Path(tmp) / case).mkdir()
            result[case] = run_case(case, ckpt, Path(tmp) / case)
    GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
