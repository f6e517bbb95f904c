"""ControlNets under the memory modes: the same numbers in full, medium and low mode, and the residency
protocol observed with ``track_cpu_copies`` (an onload is a real copy, so "on the device" can be seen): resident
from the first step in full mode; in medium and low mode on the device only while it runs, streamed group by
group (at most its two largest groups at once), nothing of it left after the sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.control.controlled import ControlledUNet
from ldm.control.files import build_control_net
from ldm.control.units import ControlUnit, control_config
from ldm.control.placement import PlacedControlNet
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.memory.residency import Residency
from optimizedSD import optimized_txt2img
from optimizedSD.arguments import SAMPLERS
from tests.control_files import hint_png, random_control_state, save_v11
from tests.test_cli_vs_diffusers import TINY_CONFIG


@pytest.fixture(scope="module")
def control_state():
    return random_control_state(TINY_CONFIG)


def run_steps(sd, control_state, mode, events):
    residency = Residency(sd, "cpu", mode, track_cpu_copies=True, on_transfer=events.append)
    net = build_control_net(control_state, control_config(sd.config), torch.float32, TINY_CONFIG)
    placed = PlacedControlNet(residency, net, "control.0")
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, sd.config.unet.context_dim, generator=g)
    outs, seen = [], []
    with residency.use("unet") as unet, torch.no_grad():
        controlled = ControlledUNet(unet, [ControlUnit(placed, hint, 0.8)], steps=3)
        for step, t in enumerate((900.0, 500.0, 100.0)):
            outs.append(controlled(x, torch.full((2,), t), context))
            seen.append(sum(g.nbytes for g in placed.groups if g.on_device))
            controlled.count_steps(None)(step, 3, x)
        controlled.release()
    after = [g.name for g in placed.groups if g.on_device]
    residency.release()
    return outs, seen, after, placed


def test_same_numbers_and_protocol_in_every_mode(tiny_checkpoint, tiny_config, control_state):
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config)
    results = {}
    for mode in ("full", "medium", "low"):
        events = []
        outs, seen, after, placed = run_steps(sd, control_state, mode, events)
        results[mode] = outs
        total = sum(g.nbytes for g in placed.groups)
        window = sum(sorted(g.nbytes for g in placed.groups)[-2:])
        onloads = [e for e in events if e.event == "onload" and e.group.startswith("control.")]
        if mode == "full":
            assert seen == [total] * 3 and len(after) == len(placed.groups)  # resident until release
            assert len(onloads) == len(placed.groups)  # copied once
        else:
            assert max(seen) <= window < total and after == []  # streamed; nothing left after the sampling
            assert sum(e.nbytes for e in onloads) >= 3 * total - window  # every step copies it again
    for mode in ("medium", "low"):
        for a, b in zip(results["full"], results[mode]):
            assert torch.equal(a, b), mode


def test_cli_images_equal_in_every_mode(tmp_path, tiny_checkpoint, control_state):
    model = save_v11(control_state, tmp_path / "control_v11p_sd15_x.safetensors")
    hint = hint_png(tmp_path / "hint.png")
    images = {}
    for mode in ("full", "medium", "low"):
        out = tmp_path / mode
        argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(out),
                "--H", "64", "--W", "64", "--n_samples", "2", "--seed", "5", "--sampler", "euler_a", "--ddim_steps", "4",
                "--vram", mode, "--skip_grid", "--no-watermark", "--control_model", str(model), "--control_image", str(hint),
                "--control_start", "0.25"]
        assert optimized_txt2img.main(argv) == 0
        images[mode] = [np.asarray(Image.open(p)) for p in sorted(out.rglob("seed_*.png"))]
    assert len(images["full"]) == 2
    for mode in ("medium", "low"):
        for a, b in zip(images["full"], images[mode]):
            assert np.array_equal(a, b), mode


@pytest.mark.slow  # by default the other tests run ddim, euler, euler_a and dpmpp_2m
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_with_a_window(tmp_path, tiny_checkpoint, control_state, sampler):
    """Each sampler with a ControlNet acting in the middle of the steps; the window changes the picture."""
    model = save_v11(control_state, tmp_path / "control.safetensors")
    hint = hint_png(tmp_path / "hint.png")

    def run(outdir, *extra):
        argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir",
                str(outdir), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", "3", "--sampler", sampler,
                "--ddim_steps", "4", "--skip_grid", "--no-watermark", "--control_model", str(model), "--control_image",
                str(hint), *extra]
        assert optimized_txt2img.main(argv) == 0
        (path,) = outdir.rglob("seed_*.png")
        return np.asarray(Image.open(path)).astype(np.float64)

    whole, window = run(tmp_path / "whole"), run(tmp_path / "window", "--control_start", "0.3", "--control_end", "0.7")
    assert np.abs(whole - window).mean() > 0.5
