"""The hires fix in the VRAM ledger (``--plan`` runs its second pass on ``meta``, ldm/ledger/calls.py): SD v1 in
fp16, batch 1 with guidance, 512 -> 1024 with the latent upscaler and with Lanczos (decode, resize, encode: the
encode at 1024 px tiles where the decode does, ldm/memory/vae_encoding.py). Targets (issue 23): low mode <= 0.60 GiB;
in every mode no more than a plain txt2img at 1024 px but for the two latents the hires fix holds besides (the first
pass's, 4x64x64, and the second pass's start, 4x128x128, float32: 320 KiB) and, with a pixel upscaler in full mode,
the VAE encoder's weights, which full mode keeps on the device once used (65 MiB), and the whole encode's excess
over the whole decode at 1024 px (full mode's decode and encode there are whole: 5.1 MiB more activations)."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.config import load_model_config
from ldm.models.autoencoder import AutoencoderKL
from optimizedSD.plan import plan_for, plan_text
from optimizedSD.arguments import parse_args
from tests.conftest import SD_V1_CONFIG, TINY_CONFIG
from tests.test_vram_ledger import plan_request

GIB = 2**30
HELD = 4 * (64 * 64 + 128 * 128) * 4  # bytes: the first pass's latents and the upscaled ones
ENCODE_OVER_DECODE = 8 << 20  # bytes: a whole 1024 px encode's activations over a whole decode's (5.1 MiB)


@pytest.fixture(scope="module")
def plans():
    return plan_for(plan_request(1024)), plan_for(plan_request(512, "--hires_scale", "2"))


def encoder_weight_bytes() -> int:
    with torch.device("meta"):
        vae = AutoencoderKL(load_model_config(SD_V1_CONFIG).vae).half()
    return sum(p.numel() * p.element_size() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())


def test_hires_512_to_1024_meets_the_targets(plans):
    plain, hires = plans
    assert hires.modes["low"].peak_bytes <= 0.60 * GIB
    for mode in ("full", "medium", "low"):
        # counted: the second pass at 1024 px sets the peak (a 512 px run alone is far below) ...
        assert hires.modes[mode].peak_bytes >= plain.modes[mode].peak_bytes, mode
        # ... and adds no more than the latents it holds
        assert hires.modes[mode].peak_bytes <= plain.modes[mode].peak_bytes + HELD, mode
    assert hires.low_tiled  # the 1024 px decode tiles in low mode, as a plain 1024 px run's


def test_hires_lanczos_512_to_1024_meets_the_targets(plans):
    """Before the tiled encode: full 3.242, medium 2.131, low 1.320 GiB (the whole encode at 1024 px set low's peak)."""
    plain, _ = plans
    lanczos = plan_for(plan_request(512, "--hires_scale", "2", "--hires_upscaler", "lanczos"))
    assert lanczos.low_tiled and lanczos.modes["low"].peak_bytes <= 0.60 * GIB
    assert lanczos.modes["low"].phase_peaks["vae"].total <= lanczos.modes["low"].phase_peaks["unet"].total
    resident = {"full": encoder_weight_bytes() + ENCODE_OVER_DECODE, "medium": 0, "low": 0}
    for mode in ("full", "medium", "low"):
        assert lanczos.modes[mode].peak_bytes >= plain.modes[mode].peak_bytes, mode
        assert lanczos.modes[mode].peak_bytes <= plain.modes[mode].peak_bytes + HELD + resident[mode], mode


@pytest.mark.slow
def test_plan_names_the_hires_size():
    request = parse_args(["--plan", "--config", str(TINY_CONFIG), "--ckpt", "none.ckpt", "--device", "cpu", "--H", "128",
                          "--W", "128", "--n_samples", "1", "--ddim_steps", "2", "--hires_scale", "1.5", "--json"],
                         "txt2img")
    answer = json.loads(plan_text(request))
    assert answer["hires"] == {"height": 192, "width": 192} and answer["height"] == 128
