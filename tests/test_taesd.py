"""TAESD through ``--vae``: every layout it ships in gives diffusers' ``AutoencoderTiny`` decode and encode, and a
whole txt2img run gives diffusers' pipeline with that tiny autoencoder.

The oracle is diffusers' ``AutoencoderTiny`` with random weights (seeded), saved as a folder, as its single
``diffusion_pytorch_model.safetensors``, and as the original ``taesd_encoder.pth``/``taesd_decoder.pth`` pair
(diffusers' keys, the decoder's indices one up for the original's weightless ``Clamp``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.errors import CheckpointError
from ldm.errors import UserError
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.memory.residency import Residency
from ldm.memory.vae_decoding import decode_latents
from ldm.models.taesd import TinyAutoencoder
from optimizedSD import optimized_img2img, optimized_txt2img

# Relative to the largest value: the same convolutions in fp32, ours in channels-last order on the CPU (oneDNN
# sums in another order there: 2.4e-5 of the largest value seen; a wrong layer is off by the value itself).
TOLERANCE = 1e-4


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return bool((ours - theirs).abs().max() <= TOLERANCE * theirs.abs().max())


@pytest.fixture(scope="module")
def reference():
    from diffusers import AutoencoderTiny

    torch.manual_seed(11)
    model = AutoencoderTiny().eval()
    with torch.no_grad():  # livelier than the default init, so that a wrong layer shows
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _original_pair(model, folder, with_encoder=True):
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    decoder = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in state.items() if k.startswith("decoder.")}
    torch.save(decoder, folder / "taesd_decoder.pth")
    if with_encoder:
        encoder = {k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder.")}
        torch.save(encoder, folder / "taesd_encoder.pth")
    return folder


LAYOUTS = {
    "diffusers folder": lambda model, tmp: (model.save_pretrained(tmp / "taesd"), tmp / "taesd")[1],
    "diffusers file": lambda model, tmp: (model.save_pretrained(tmp / "taesd"),
                                          tmp / "taesd" / "diffusion_pytorch_model.safetensors")[1],
    "original pair folder": lambda model, tmp: _original_pair(model, tmp / "pair"),
    "original decoder file": lambda model, tmp: _original_pair(model, tmp / "pair") / "taesd_decoder.pth",
    "original encoder file": lambda model, tmp: _original_pair(model, tmp / "pair") / "taesd_encoder.pth",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_taesd_layouts_decode_and_encode_as_diffusers(layout, reference, tiny_checkpoint, tiny_config_path, tmp_path):
    path = LAYOUTS[layout](reference, tmp_path)
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=path)
    assert isinstance(sd.vae, TinyAutoencoder) and sd.scale_factor == 1.0
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        theirs = reference.decode(latents).sample
        ours = decode_latents(sd.vae, latents)
        assert ours.shape == theirs.shape == (1, 3, 64, 64) and theirs.std() > 0.05
        assert close(ours, theirs)
        encoded = sd.vae.encode(image).sample(torch.randn(1, 4, 8, 8))
        assert close(encoded, reference.encode(image).latents)


def test_low_mode_streams_the_taesd_decoder(reference, tiny_checkpoint, tiny_config_path, tmp_path):
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=LAYOUTS["diffusers folder"](reference, tmp_path))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    residency = Residency(sd, torch.device("cpu"), "low", track_cpu_copies=True)
    with residency.use("vae.decoder") as vae, torch.no_grad():
        streamed = decode_latents(vae, latents)
    residency.release()
    with torch.no_grad():
        assert close(streamed, reference.decode(latents).sample)


def test_decoder_alone_decodes_and_refuses_to_encode(reference, tiny_checkpoint, tiny_config_path, tmp_path):
    path = _original_pair(reference, tmp_path / "decoder_only", with_encoder=False) / "taesd_decoder.pth"
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=path)
    with torch.no_grad(), pytest.raises(UserError, match="taesd_encoder.pth"):
        sd.vae.encode(torch.zeros(1, 3, 64, 64))
    (tmp_path / "encoder_only").mkdir()
    encoder = _original_pair(reference, tmp_path / "e") / "taesd_encoder.pth"
    lone = tmp_path / "encoder_only" / "taesd_encoder.pth"
    lone.write_bytes(encoder.read_bytes())
    with pytest.raises(CheckpointError, match="without its decoder"):
        load_stable_diffusion(tiny_checkpoint, tiny_config_path, vae=lone)


def _cli_image(outdir):
    (path,) = list(outdir.rglob("seed_*.png"))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64), image.info.get("parameters", "")


def test_txt2img_with_taesd_matches_diffusers_pipeline(reference, tiny_config_path, tmp_path):
    from ldm.config import load_model_config
    from ldm.loading.random_weights import random_state_dict, save_checkpoint
    from ldm.samplers.noise import SeededNoise
    from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint

    state = random_state_dict(load_model_config(tiny_config_path), seed=2024)
    ckpt = save_checkpoint(state, tmp_path / "random.safetensors")
    vae_file = LAYOUTS["diffusers file"](reference, tmp_path)
    seed, prompt, steps = 8, "a lighthouse at dusk", 4
    argv = ["--ckpt", str(ckpt), "--config", str(tiny_config_path), "--device", "cpu", "--precision", "full",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(seed),
            "--sampler", "ddim", "--ddim_steps", str(steps), "--scale", "5", "--prompt", prompt,
            "--no-watermark", "--skip_grid", "--vae", str(vae_file)]
    assert optimized_txt2img.main(argv) == 0
    ours, parameters = _cli_image(tmp_path / "out")

    pipe = diffusers_pipeline_from_checkpoint(state, tiny_config_path)
    pipe.vae = reference
    pipe.register_modules(vae=reference)
    with torch.no_grad():
        theirs = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=5.0, eta=0.0,
                      latents=SeededNoise([seed]).initial((4, 8, 8)), output_type="np").images[0]
    theirs = np.round(theirs * 255).astype(np.float64)
    assert ours.std() > 1
    assert np.abs(ours - theirs).mean() <= 1.0, np.abs(ours - theirs).mean()
    assert "VAE: diffusion_pytorch_model.safetensors" in parameters and "VAE hash: " in parameters


def test_img2img_with_taesd_decoder_alone_is_one_line(reference, tiny_checkpoint, tiny_config_path, tmp_path, capsys):
    path = _original_pair(reference, tmp_path / "decoder_only", with_encoder=False) / "taesd_decoder.pth"
    Image.new("RGB", (64, 64), (120, 40, 200)).save(tmp_path / "init.png")
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config_path), "--device", "cpu", "--precision",
            "full", "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", "1",
            "--ddim_steps", "2", "--prompt", "x", "--init-img", str(tmp_path / "init.png"), "--vae", str(path)]
    assert optimized_img2img.main(argv) == 2
    err = capsys.readouterr().err
    assert "taesd_encoder.pth" in err and "Traceback" not in err


def test_ledger_low_mode_taesd_decode_peak_is_below_the_unet_phase():
    """SD v1 at 512x512 in low mode, fp16 (meta): 0.315 GiB for the KL decoder's decode, 0.096 GiB for
    TAESD's, both under the UNet phase's 0.352 GiB."""
    from ldm.ledger import RunShape, meta_stable_diffusion, simulate
    from tests.conftest import SD_V1_CONFIG

    shape = RunShape(512, 512, steps=1, sampler="ddim")
    tiny = simulate(meta_stable_diffusion(SD_V1_CONFIG, torch.float16, taesd=True), "low", shape)
    kl = simulate(meta_stable_diffusion(SD_V1_CONFIG, torch.float16), "low", shape)
    assert tiny.phase_peaks["vae"].total <= tiny.phase_peaks["unet"].total
    assert tiny.phase_peaks["vae"].total < 0.5 * kl.phase_peaks["vae"].total
    assert tiny.phase_peaks["unet"].total == kl.phase_peaks["unet"].total


def test_plan_counts_a_taesd_vae_in_the_kl_vaes_place(reference, tmp_path, capsys):
    """``--plan --vae TAESD`` (SD v1, 768x768, fp16): the decode is TAESD's, so low mode needs no tiles, and its
    whole-image decode (0.214 GiB) is below the KL VAE's tiled one (0.328 GiB) and the UNet phase's."""
    import json

    from tests.conftest import SD_V1_CONFIG

    path = LAYOUTS["diffusers file"](reference, tmp_path)
    argv = ["--plan", "--config", str(SD_V1_CONFIG), "--ckpt", "none.ckpt", "--device", "cpu", "--H", "768", "--W", "768",
            "--n_samples", "1", "--sampler", "ddim", "--ddim_steps", "2"]
    assert optimized_txt2img.main(argv) == 0
    kl_table = capsys.readouterr().out
    assert optimized_txt2img.main([*argv, "--vae", str(path)]) == 0
    tiny_table = capsys.readouterr().out
    assert "decodes in 512 px tiles" in kl_table and "tiles" not in tiny_table
    assert optimized_txt2img.main([*argv, "--json"]) == 0
    kl = json.loads(capsys.readouterr().out)["modes"]["low"]["phase_peaks"]
    assert optimized_txt2img.main([*argv, "--json", "--vae", str(path)]) == 0
    tiny = json.loads(capsys.readouterr().out)["modes"]["low"]["phase_peaks"]
    assert tiny["vae"] < 0.7 * kl["vae"] and tiny["vae"] <= tiny["unet"] == kl["unet"]
    original = _original_pair(reference, tmp_path / "pair")  # the original .pth pair's folder: a TAESD too
    assert optimized_txt2img.main([*argv, "--json", "--vae", str(original)]) == 0
    assert json.loads(capsys.readouterr().out)["modes"]["low"]["phase_peaks"] == tiny
    assert optimized_txt2img.main([*argv, "--vae", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--vae not found" in err and "Traceback" not in err
