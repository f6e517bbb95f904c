"""``--preview_every``: the webui's "Approx cheap" latent-to-RGB map, and the preview files a run writes (TAESD's
at full size when it is the VAE)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm.models.latent_preview import CHEAP_RGB, cheap_approximation
from optimizedSD import optimized_txt2img


def test_cheap_approximation_is_the_webuis_linear_map():
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    coefficients = torch.tensor(CHEAP_RGB)  # sd_vae_approx.cheap_approximation: einsum("...lxy,lr -> ...rxy")
    expected = (latents.permute(0, 2, 3, 1) @ coefficients).permute(0, 3, 1, 2)
    assert torch.allclose(cheap_approximation(latents), expected, atol=1e-6)
    assert CHEAP_RGB[0] == (0.298, 0.207, 0.208) and CHEAP_RGB[3] == (-0.184, -0.271, -0.473)


def _run(tiny_checkpoint, tiny_config_path, outdir, extra=()):
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config_path), "--device", "cpu", "--precision",
            "full", "--outdir", str(outdir), "--H", "64", "--W", "64", "--n_samples", "2", "--seed", "3",
            "--sampler", "euler", "--ddim_steps", "4", "--prompt", "x", "--skip_grid", "--preview_every", "2", *extra]
    assert optimized_txt2img.main(argv) == 0
    return sorted((outdir / "previews").iterdir())


def test_preview_every_writes_the_running_images(tiny_checkpoint, tiny_config_path, tmp_path):
    files = _run(tiny_checkpoint, tiny_config_path, tmp_path / "out")
    assert [f.name for f in files] == ["seed_3_step_002.png", "seed_3_step_004.png", "seed_4_step_002.png",
                                       "seed_4_step_004.png"]
    with Image.open(files[0]) as image:
        assert image.size == (8, 8)  # the latent's size
    again = _run(tiny_checkpoint, tiny_config_path, tmp_path / "out", ["--n_samples", "1", "--ddim_steps", "2"])
    assert len(again) == 5 and (tmp_path / "out" / "previews" / "seed_3_step_002_2.png").is_file()  # none replaced


@pytest.mark.slow
def test_preview_with_taesd_is_full_size(tiny_checkpoint, tiny_config_path, tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(tmp_path / "taesd")
    files = _run(tiny_checkpoint, tiny_config_path, tmp_path / "out", ["--vae", str(tmp_path / "taesd")])
    with Image.open(files[-1]) as image:
        assert image.size == (64, 64)
