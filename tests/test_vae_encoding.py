"""The tiled VAE encode (ldm/memory/vae_encoding.py) gives the whole-image encode's posterior up to float rounding:
the GroupNorm statistics are the whole picture's and every tile carries the halo its convolution needs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import ldm.memory.vae_encoding as vae_encoding
from ldm.config import load_model_config
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.memory.vae_encoding import encode_pixels, encode_tiled
from ldm.models.autoencoder import AutoencoderKL
from ldm.passes.hires import upscale
from ldm.pipeline.request import HiresOptions
from tests.conftest import SD_V1_CONFIG
from tests.test_cli_img2img import make_image, pixels as png_pixels, run, samples
from tests.test_cli_inpaint import files, run as inpaint, samples as inpaint_samples  # noqa: F401 (a fixture)
from tests.test_hires_fix import SIZE, tiny_run  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def tiny_vae(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path).vae


def pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A picture with structure (a gradient, an edge) and noise, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, width)[None, None, None, :].expand(1, 3, height, width)
    edge = (torch.arange(height) > height // 3).float()[None, None, :, None] - 0.5
    return (0.6 * ramp + 0.4 * edge + 0.3 * torch.randn(1, 3, height, width, generator=generator)).clamp(-1, 1)


def difference(vae, image, monkeypatch, tile_elements):
    monkeypatch.setattr(vae_encoding, "TILE_ELEMENTS", tile_elements)
    with torch.no_grad():
        whole = vae.encode(image)
        tiled = encode_tiled(vae, image, torch.device("cpu"))
    assert tiled.mean.shape == whole.mean.shape
    return ((tiled.mean - whole.mean).abs().max() / whole.mean.abs().max(),
            ((tiled.std - whole.std).abs().max() / whole.std.abs().max()))


@pytest.mark.parametrize("size", [(96, 160), (136, 72)])  # 72 and 136: tiles that are not multiples of 8
def test_tiled_encode_equals_the_whole_encode_on_the_tiny_vae(tiny_vae, monkeypatch, size):
    # 32-channel tiles of 11 x 11 px (levels of 32 and 64 channels): dozens of tiles at every level
    mean, std = difference(tiny_vae, pixels(*size), monkeypatch, 64 * 11 * 11)
    assert mean < 1e-5 and std < 1e-5


def test_tiled_encode_equals_the_whole_encode_on_sd_v1_shapes(monkeypatch):
    """SD v1's VAE (128-512 channels, 2 blocks a level) with random weights, 192 x 128 px in 6 x 4 tiles at the first
    level."""
    torch.manual_seed(0)
    vae = AutoencoderKL(load_model_config(SD_V1_CONFIG).vae).eval()
    mean, std = difference(vae, pixels(192, 128, seed=1), monkeypatch, 128 * 32 * 32)
    assert mean < 1e-5 and std < 1e-5


def test_encode_pixels_tiles_only_when_asked(tiny_vae, monkeypatch):
    calls = []
    monkeypatch.setattr(vae_encoding, "encode_tiled", lambda *args: calls.append(args) or tiny_vae.encode(args[1]))
    image = pixels(64, 64)
    encode_pixels(tiny_vae, image, torch.device("cpu"), torch.float32, tiled=False)
    assert not calls
    encode_pixels(tiny_vae, image, torch.device("cpu"), torch.float32, tiled=True)
    assert len(calls) == 1


@pytest.fixture
def spy(monkeypatch):
    """Counts the tiled encodes, in small tiles (dozens a level on the tiny model)."""
    monkeypatch.setattr(vae_encoding, "TILE_ELEMENTS", 64 * 11 * 11)
    calls = []
    real = vae_encoding.encode_tiled
    monkeypatch.setattr(vae_encoding, "encode_tiled", lambda *args: calls.append(args[1].shape) or real(*args))
    return calls


def test_img2img_with_vae_tiling_encodes_in_tiles_and_keeps_the_image(tiny_checkpoint, tmp_path, spy):
    """img2img's init image at 128 px: ``--vae_tiling`` tiles its encode (its decode is one tile at this size), and the
    posterior sample (mean + std * the seed's noise) gives the same picture within one 8-bit level."""
    init = make_image(tmp_path / "init.png", (128, 128))
    for name, extra in (("whole", ()), ("tiled", ("--vae_tiling",))):
        assert run(tiny_checkpoint, tmp_path / name, init, "--H", "128", "--W", "128", *extra) == 0
    assert spy == [(1, 3, 128, 128)]
    whole, tiled = (png_pixels(samples(tmp_path / name)[0]) for name in ("whole", "tiled"))
    assert np.abs(whole - tiled).max() <= 1


def test_hires_pixel_upscaler_encodes_in_tiles_where_the_decode_tiles(tiny_run, spy):
    """The hires fix's Lanczos path, ``tiled`` as the run's decode: the same posterior mean within 1e-5."""
    base, model, _ = tiny_run
    request = replace(base, hires=HiresOptions(scale=1.5, upscaler="lanczos"))
    latents = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(2))
    whole = upscale(request, model, latents)
    assert not spy
    tiled = upscale(request, model, latents, tiled=True)
    assert spy == [(1, 3, 192, 192)] * 2
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_inpainting_with_vae_tiling_encodes_both_images_in_tiles(files, tmp_path, spy):
    """A 9-channel inpainting UNet at strength 0.8 encodes the init image and the masked image: with ``--vae_tiling``
    both in tiles, the picture the same within one 8-bit level."""
    for name, extra in (("whole", ()), ("tiled", ("--vae_tiling",))):
        assert inpaint(files, "nine", tmp_path / name, "--strength", "0.8", *extra) == 0
    assert len(spy) == 2
    whole, tiled = (png_pixels(inpaint_samples(tmp_path / name)[0]) for name in ("whole", "tiled"))
    assert np.abs(whole - tiled).max() <= 1
