"""Attention backends give the same numbers; tiled VAE decoding stitches tiles without seams."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ldm.models.attention import get_attention_backend, set_attention_backend
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.pipeline.model import attention_name
from ldm.memory.vae_decoding import decode_latents, decode_tiled, should_tile


@pytest.fixture(scope="module")
def sd(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path)


@pytest.fixture
def restore_backend():
    yield
    set_attention_backend("sdpa")


@pytest.mark.parametrize("slice_size", [1, 7, None])
def test_sliced_attention_equals_sdpa(sd, restore_backend, slice_size):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        fused = sd.unet(x, t, context)
        set_attention_backend("sliced", slice_size)
        assert get_attention_backend().name == "sliced"
        sliced = sd.unet(x, t, context)
    assert (fused - sliced).abs().max() < 1e-5


@pytest.mark.parametrize("slice_size", [1, 100, None])
def test_the_vae_attention_follows_the_backend(sd, restore_backend, monkeypatch, slice_size):
    import ldm.models.attention as attention_module

    calls = []
    real = attention_module._sliced_attention
    monkeypatch.setattr(attention_module, "_sliced_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    latents = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = sd.vae.decode(latents)
        assert calls == []
        set_attention_backend("sliced", slice_size)
        sliced = sd.vae.decode(latents)
    assert calls and calls[0][2] == 144  # the mid block's attention over 12x12 latent pixels, sliced
    assert (fused - sliced).abs().max() < 1e-5


def test_auto_attention_slices_on_mps_only():
    assert attention_name("auto", torch.device("mps")) == "sliced"
    assert attention_name("auto", torch.device("cuda", 0)) == "sdpa"
    assert attention_name("auto", torch.device("cpu")) == "sdpa"
    assert attention_name("auto", torch.device("meta")) == "sdpa"  # the VRAM ledger's stand-in for CUDA
    assert attention_name("sliced", torch.device("cuda", 0)) == "sliced"
    assert attention_name("sliced", torch.device("cpu")) == "sliced"


def test_unknown_backend_is_refused(restore_backend):
    with pytest.raises(ValueError, match="sdpa or sliced"):
        set_attention_backend("xformers")


class _LocalDecoder:
    """A stand-in VAE whose decode is pixel-local (nearest upsampling), so tiling must be exact."""

    config = SimpleNamespace(downsampling_factor=8, out_ch=3)

    def decode(self, z):
        return F.interpolate(z[:, :3] * 2.0, scale_factor=8, mode="nearest")


@pytest.mark.parametrize("shape", [(1, 4, 40, 24), (2, 4, 17, 33)])
def test_tiles_are_stitched_exactly(shape):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    vae = _LocalDecoder()
    tiled = decode_tiled(vae, z, tile=12, overlap=4)
    assert tiled.shape == vae.decode(z).shape
    assert torch.allclose(tiled, vae.decode(z), atol=1e-6)


def test_one_tile_is_the_plain_decode(sd):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(decode_tiled(sd.vae, z, tile=8, overlap=2), sd.vae.decode(z))


def test_tiled_decode_is_close_to_the_whole_decode(sd):
    z = torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = sd.vae.decode(z)
        tiled = decode_tiled(sd.vae, z, tile=12, overlap=4)
    assert tiled.shape == whole.shape == (1, 3, 192, 128)
    # GroupNorm statistics are per tile (and a random tiny VAE leans on them hard), so not equal; but a
    # misplaced or flipped tile would differ by about sqrt(2) * std, far above this bound.
    assert (tiled - whole).abs().mean() < 0.35 * whole.std()


def test_bad_overlap_is_refused(sd):
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(sd.vae, torch.zeros(1, 4, 8, 8), tile=4, overlap=4)


def test_tiling_is_automatic_above_1024_px():
    assert not should_tile(1024, 768, requested=False)
    assert should_tile(1088, 512, requested=False)
    assert should_tile(256, 256, requested=True)


def test_an_overflowing_half_vae_is_retried_in_fp32(tiny_checkpoint, tiny_config_path, sd):
    half = load_stable_diffusion(tiny_checkpoint, tiny_config_path, dtype=torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 3e4  # overflows fp16 activations
    with torch.no_grad():
        assert not torch.isfinite(half.vae.decode(z)).all()
        images = decode_latents(half.vae, z)
        reference = sd.vae.decode(z)
    assert torch.isfinite(images).all()
    assert images.dtype == torch.float32
    assert torch.allclose(images, reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item())
    assert half.vae.dtype == torch.float16  # the model itself is left in half precision


def test_the_backend_context_manager_restores_the_previous_backend(restore_backend):
    from ldm.models.attention import attention_backend

    assert get_attention_backend().name == "sdpa"
    with attention_backend("sliced", 7) as backend:
        assert backend == get_attention_backend() and (backend.name, backend.slice_size) == ("sliced", 7)
        with pytest.raises(RuntimeError):
            with attention_backend("sdpa"):
                assert get_attention_backend().name == "sdpa"
                raise RuntimeError("out of memory")
        assert get_attention_backend().name == "sliced"  # restored after the error too
    assert get_attention_backend().name == "sdpa"
    with pytest.raises(ValueError, match="sdpa or sliced"):
        with attention_backend("xformers"):
            pass


def test_the_vae_attention_hands_fused_kernels_a_contiguous_last_dimension(tiny_config_path, monkeypatch):
    """CUDA's flash and memory-efficient kernels need the last dimension contiguous; otherwise SDPA builds
    the whole (h*w)^2 score matrix (2.4 GiB at 1024 px in the VAE's mid block). Checked on meta (the GPU's
    stand-in); the CPU keeps its strided inputs, and so its exact numbers."""
    import ldm.models.autoencoder as autoencoder_module
    from ldm.ledger import meta_stable_diffusion

    strides = []
    real = autoencoder_module.attention
    monkeypatch.setattr(autoencoder_module, "attention", lambda q, k, v: strides.append([t.stride(-1) for t in (q, k, v)]) or real(q, k, v))
    vae = meta_stable_diffusion(tiny_config_path, torch.float16).vae
    with torch.no_grad():
        vae.decode(torch.empty(1, 4, 8, 8, device="meta"))
    assert strides and all(s == [1, 1, 1] for s in strides)
