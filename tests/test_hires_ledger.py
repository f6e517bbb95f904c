"""The hires fix in the VRAM ledger (``--plan`` runs its second pass on ``meta``, ldm/ledger/calls.py): SD v1 in
fp16, batch 1 with guidance, 512 -> 1024 with the latent upscaler. Targets (issue 23): low mode <= 0.60 GiB; in
every mode no more than a plain txt2img at 1024 px but for the two latents the hires fix holds besides (the first
pass's, 4x64x64, and the second pass's start, 4x128x128, float32: 320 KiB)."""

from __future__ import annotations

import json

import pytest

from optimizedSD.plan import plan_for, plan_text
from optimizedSD.arguments import parse_args
from tests.conftest import TINY_CONFIG
from tests.test_vram_ledger import plan_request

GIB = 2**30
HELD = 4 * (64 * 64 + 128 * 128) * 4  # bytes: the first pass's latents and the upscaled ones


@pytest.fixture(scope="module")
def plans():
    return plan_for(plan_request(1024)), plan_for(plan_request(512, "--hires_scale", "2"))


def test_hires_512_to_1024_meets_the_targets(plans):
    plain, hires = plans
    assert hires.modes["low"].peak_bytes <= 0.60 * GIB
    for mode in ("full", "medium", "low"):
        # counted: the second pass at 1024 px sets the peak (a 512 px run alone is far below) ...
        assert hires.modes[mode].peak_bytes >= plain.modes[mode].peak_bytes, mode
        # ... and adds no more than the latents it holds
        assert hires.modes[mode].peak_bytes <= plain.modes[mode].peak_bytes + HELD, mode
    assert hires.low_tiled  # the 1024 px decode tiles in low mode, as a plain 1024 px run's


@pytest.mark.slow
def test_plan_names_the_hires_size():
    request = parse_args(["--plan", "--config", str(TINY_CONFIG), "--ckpt", "none.ckpt", "--device", "cpu", "--H", "128",
                          "--W", "128", "--n_samples", "1", "--ddim_steps", "2", "--hires_scale", "1.5", "--json"],
                         "txt2img")
    answer = json.loads(plan_text(request))
    assert answer["hires"] == {"height": 192, "width": 192} and answer["height"] == 128
