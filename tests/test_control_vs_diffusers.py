"""The CLI's ControlNet images against diffusers' ``StableDiffusionControlNetPipeline`` reading the same random
ControlNet file through diffusers' own converter (``convert_controlnet_checkpoint``), on the tiny model: same
initial noise, DDIM with a step count dividing 1000, the hint given to diffusers as the same [0, 1] tensor.
Tolerance as tests/test_cli_vs_diffusers.py: mean absolute difference within one 8-bit level, at most 0.2 % of
the values different (measured: 0.0000-0.0002 levels, against a ControlNet effect of 6-16 levels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import load_model_config
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from ldm.samplers.noise import SeededNoise
from optimizedSD import optimized_txt2img
from tests.control_files import (
    diffusers_control_pipeline, diffusers_controlnet, hint_png, png_hint_tensor, random_control_state, save_v10,
    save_v11,
)
from tests.test_cli_vs_diffusers import TINY_CONFIG, diffusers_pipeline_from_checkpoint

SEED, STEPS, SCALE, PROMPT = 31, 5, 7.5, "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control")
    state = random_state_dict(load_model_config(TINY_CONFIG), seed=2024)
    control = [random_control_state(TINY_CONFIG, seed=s) for s in (7, 8)]
    half = {k: v.half() for k, v in control[0].items()}
    return {
        "v10": save_v10(control[0], folder / "control_sd15_random.pth", state),
        "fp16": save_v11(half, folder / "control_v11p_sd15_random_fp16.safetensors"), "fp16_state": half,
        "state": state, "base": diffusers_pipeline_from_checkpoint(state, TINY_CONFIG), "ckpt": save_checkpoint(state, folder / "random.ckpt"), "control_states": control,
        "pth": save_v11(control[0], folder / "control_v11p_sd15_random.pth"),
        "safetensors": save_v11(control[1], folder / "control_v11p_sd15_second.safetensors"),
        "hints": [hint_png(folder / "hint0.png", seed=3), hint_png(folder / "hint1.png", seed=4)],
    }


def run_cli(tmp_path: Path, files, extra: list[str], name: str = "out") -> np.ndarray:
    argv = ["--ckpt", str(files["ckpt"]), "--config", str(TINY_CONFIG), "--device", "cpu", "--precision", "full",
            "--outdir", str(tmp_path / name), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(SEED),
            "--sampler", "ddim", "--ddim_steps", str(STEPS), "--scale", str(SCALE), "--prompt", PROMPT,
            "--no-watermark", "--skip_grid", *extra]
    assert optimized_txt2img.main(argv) == 0
    (path,) = list((tmp_path / name).rglob("seed_*.png"))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, files) -> np.ndarray:
    return run_cli(tmp_path_factory.mktemp("plain"), files, [])


def run_diffusers(files, indices, weights, starts, ends, layout="pth") -> np.ndarray:
    states = [files["control_states"][i] for i in indices]
    if layout == "v10":  # diffusers' converter reads the 1.0 layout (control_model.*, base keys beside) itself
        states[0] = {f"control_model.{k}": v for k, v in states[0].items()} | files["state"]
    if layout == "fp16":
        states[0] = {k: v.float() for k, v in files["fp16_state"].items()}
    nets = [diffusers_controlnet(state, TINY_CONFIG) for state in states]
    pipe = diffusers_control_pipeline(files["base"], nets)
    hints = [png_hint_tensor(files["hints"][i]) for i in indices]
    single = len(indices) == 1
    with torch.no_grad():
        image = pipe(PROMPT, image=hints[0] if single else hints, height=64, width=64, num_inference_steps=STEPS,
                     guidance_scale=SCALE, eta=0.0, latents=SeededNoise([SEED]).initial((4, 8, 8)), output_type="np",
                     controlnet_conditioning_scale=weights[0] if single else weights,
                     control_guidance_start=starts[0] if single else starts,
                     control_guidance_end=ends[0] if single else ends).images[0]
    return np.round(image * 255).astype(np.float64)


def control_flags(files, indices, weights, starts, ends, layout="pth") -> list[str]:
    flags = []
    for i, w, s, e in zip(indices, weights, starts, ends):
        model = files[layout] if i == 0 else files["safetensors"]
        flags += ["--control_model", str(model), "--control_image", str(files["hints"][i]), "--control_weight", str(w),
                  "--control_start", str(s), "--control_end", str(e)]
    return flags


CASES = {  # layout of the first ControlNet's file, then ControlNets, weights, starts, ends
    "v1.1-pth": ("pth", [0], [1.0], [0.0], [1.0]),
    "weight-0.6-window-0.2-0.8": ("pth", [0], [0.6], [0.2], [0.8]),
    "two": ("pth", [0, 1], [1.0, 0.7], [0.0, 0.1], [1.0, 0.9]),
    "v1.0-with-base-keys": ("v10", [0], [1.0], [0.0], [1.0]),
    "fp16-file": ("fp16", [0], [1.0], [0.0], [1.0]),
}
SLOW = ("v1.0-with-base-keys", "fp16-file")  # their files read to the v1.1 tensors: tests/test_control_files.py


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_control_matches_diffusers(tmp_path, files, plain, case):
    layout, indices, weights, starts, ends = CASES[case]
    ours = run_cli(tmp_path, files, control_flags(files, indices, weights, starts, ends, layout))
    theirs = run_diffusers(files, indices, weights, starts, ends, layout)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - plain).mean() > 3, "the ControlNet changed nothing"
    difference = np.abs(ours - theirs).mean()
    print(f"{case}: mean |CLI - diffusers| = {difference:.4f} levels, ControlNet's effect {np.abs(ours - plain).mean():.1f}")
    assert difference <= 1.0, difference
    assert (ours != theirs).mean() <= 0.002, (ours != theirs).mean()  # at most a stray rounding flip


def test_weight_zero_is_the_plain_image(tmp_path, files, plain):
    ours = run_cli(tmp_path, files, control_flags(files, [0], [0.0], [0.0], [1.0]))
    assert np.array_equal(ours, plain)
