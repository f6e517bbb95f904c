"""Our UNet, VAE and text encoder, loaded from a CompVis-layout file, give diffusers' and transformers'
numbers on the same file (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from ldm.loading.stable_diffusion import load_stable_diffusion
from tests.reference import diffusers_unet, diffusers_vae, max_abs_diff, transformers_text_encoder

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["safetensors", "ckpt"])
def loaded(request, tiny_checkpoint, tiny_checkpoint_ckpt, tiny_config_path):
    path = tiny_checkpoint if request.param == "safetensors" else tiny_checkpoint_ckpt
    return load_stable_diffusion(path, tiny_config_path)


def test_unet_matches_diffusers(loaded, tiny_state_dict, tiny_config_path):
    reference = diffusers_unet(tiny_state_dict, tiny_config_path)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([1.0, 981.0])
    with torch.no_grad():
        ours = loaded.unet(x, t, context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    assert ours.abs().mean() > 0.01  # random weights give a non-trivial output
    assert max_abs_diff(ours, theirs) < TOLERANCE


def test_unet_fractional_timesteps_match_diffusers(loaded, tiny_state_dict, tiny_config_path):
    # The k-diffusion samplers call the UNet at interpolated timesteps.
    reference = diffusers_unet(tiny_state_dict, tiny_config_path)
    x = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([123.456])
    with torch.no_grad():
        assert max_abs_diff(loaded.unet(x, t, context), reference(x, t, encoder_hidden_states=context).sample) < TOLERANCE


def test_vae_encode_and_decode_match_diffusers(loaded, tiny_state_dict, tiny_config_path):
    reference = diffusers_vae(tiny_state_dict, tiny_config_path)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = loaded.vae.encode(image), reference.encode(image).latent_dist
        assert max_abs_diff(ours.mean, theirs.mean) < TOLERANCE
        assert max_abs_diff(ours.std, theirs.std) < TOLERANCE
        assert max_abs_diff(loaded.vae.decode(latent), reference.decode(latent).sample) < TOLERANCE


def test_text_encoder_matches_transformers(loaded, tiny_state_dict, tiny_config):
    reference = transformers_text_encoder(tiny_state_dict, tiny_config.text)
    prompts = ["a photograph of an astronaut riding a horse", ""]
    ids = loaded.text_encoder.tokenize(prompts)
    with torch.no_grad():
        ours = loaded.text_encoder.encode(prompts)
        theirs = reference(input_ids=ids).last_hidden_state
    assert ours.shape == (2, 77, 32)
    assert max_abs_diff(ours, theirs) < TOLERANCE


def test_schedule_comes_from_the_config(tiny_state_dict, tiny_config_path, tmp_path):
    """The config's float64 schedule, as diffusers and ComfyUI compute it; the file's buffers are not used."""
    from ldm.loading.random_weights import save_checkpoint
    from ldm.samplers.schedule import DiffusionSchedule

    state = dict(tiny_state_dict)
    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.5
    path = save_checkpoint(state, tmp_path / "schedule.safetensors")
    sd = load_stable_diffusion(path, tiny_config_path)
    assert torch.equal(sd.alphas_cumprod, DiffusionSchedule.from_config(sd.config.schedule).alphas_cumprod)
    assert sd.alphas_cumprod.dtype == torch.float64


def test_fp16_load(tiny_checkpoint, tiny_config_path):
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, dtype=torch.float16)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    # integer buffers (CLIP position ids) keep their dtype
    assert sd.text_encoder.transformer.get_input_embeddings().weight.dtype == torch.float16
