"""``--deepcache N`` against the DeepCache authors' ``DeepCacheSDHelper`` (PyPI ``deepcache``) on diffusers' pipeline:
the same image for DDIM and Euler, in full and low mode, for branch 0 and a deeper one; low mode's cached steps
move only the groups they run; metadata and ``--from_png`` carry the setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import load_model_config
from ldm.errors import UsageError
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from ldm.memory.deep_cache import shallow_parts
from ldm.models.unet import UNetModel
from ldm.samplers.noise import SeededNoise
from optimizedSD import optimized_txt2img

STEPS, SEED, PROMPT, SCALE = 10, 5, "a castle on a hill", 6.0


@pytest.fixture(scope="module")
def model_files(tiny_config_path, tmp_path_factory):
    state = random_state_dict(load_model_config(tiny_config_path), seed=909)
    return state, save_checkpoint(state, tmp_path_factory.mktemp("dc") / "random.safetensors")


def _ours(ckpt, config, outdir, sampler, extra=()):
    argv = ["--ckpt", str(ckpt), "--config", str(config), "--device", "cpu", "--precision", "full",
            "--outdir", str(outdir), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(SEED),
            "--sampler", sampler, "--ddim_steps", str(STEPS), "--scale", str(SCALE), "--prompt", PROMPT,
            "--no-watermark", "--skip_grid", *extra]
    assert optimized_txt2img.main(argv) == 0
    (path,) = list(outdir.rglob("seed_*.png"))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64), image.info["parameters"], path


def _theirs(state, config, sampler, interval, branch):
    from DeepCache import DeepCacheSDHelper
    from diffusers import EulerDiscreteScheduler

    from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint

    pipe = diffusers_pipeline_from_checkpoint(state, config)
    latents = SeededNoise([SEED]).initial((4, 8, 8))
    if sampler == "euler":  # k-diffusion's uniform grid: integer timesteps 999, 888, ... 0 for 10 steps
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        pipe.scheduler.set_timesteps(STEPS)
        sigma_max = float(pipe.scheduler.sigmas[0])
        latents = latents * sigma_max / pipe.scheduler.init_noise_sigma  # ours starts at sigma_max * noise
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    with torch.no_grad():
        image = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, guidance_scale=SCALE, eta=0.0,
                     latents=latents, output_type="np").images[0]
    helper.disable()
    return np.round(image * 255).astype(np.float64)


@pytest.mark.parametrize("sampler, vram, branch", [
    ("ddim", "full", 0), ("euler", "full", 0), ("ddim", "low", 0), ("euler", "low", 1)])
def test_deepcache_matches_deepcache_sd_helper(model_files, tiny_config_path, tmp_path, sampler, vram, branch):
    state, ckpt = model_files
    extra = ["--deepcache", "3", "--vram", vram] + (["--deepcache_branch", str(branch)] if branch else [])
    ours, parameters, _ = _ours(ckpt, tiny_config_path, tmp_path / "out", sampler, extra)
    theirs = _theirs(state, tiny_config_path, sampler, 3, branch)
    assert ours.std() > 1
    assert np.abs(ours - theirs).mean() <= 1.0, np.abs(ours - theirs).mean()
    if (sampler, vram) == ("ddim", "full"):  # the cache changed the picture: DeepCache ran (once is enough)
        plain, _, _ = _ours(ckpt, tiny_config_path, tmp_path / "plain", sampler)
        assert np.abs(ours - plain).mean() > 1.0
    assert "DeepCache: 3" in parameters and (f"DeepCache branch: {branch}" in parameters) == bool(branch)


def test_shallow_parts_of_sd_v1():
    names = [name for name, _ in _sd_v1_shaped().parts()]
    assert shallow_parts(names, 0) == {"time_embed", "input_blocks.0", "output_blocks.11", "out"}
    assert shallow_parts(names, 11) == frozenset(names) - {"middle_block"}
    with pytest.raises(UsageError):
        shallow_parts(names, 12)


def _sd_v1_shaped():
    from tests.conftest import SD_V1_CONFIG

    with torch.device("meta"):
        return UNetModel(load_model_config(SD_V1_CONFIG).unet)


def test_low_mode_cached_steps_move_a_small_part_of_the_weights():
    """SD v1, fp16, on the ledger's meta device: bytes onloaded per cached step / per whole step."""
    from ldm.ledger.calls import generation_calls, shape_request
    from ldm.ledger import RunShape, meta_stable_diffusion, simulate
    from tests.conftest import SD_V1_CONFIG
    import dataclasses

    sd = meta_stable_diffusion(SD_V1_CONFIG, torch.float16)

    def onload(steps, deepcache):
        shape = RunShape(256, 256, steps=steps, sampler="ddim")
        request = dataclasses.replace(shape_request(shape), deepcache=deepcache)
        return simulate(sd, "low", shape, calls=generation_calls(request)).onload_bytes["unet"]

    whole = onload(2, 0) - onload(1, 0)
    cached = (onload(3, 3) - onload(1, 3)) / 2  # steps 1 and 2 of interval 3 are cached
    assert cached <= 0.3 * whole, (cached, whole)
    assert cached > 0


def test_from_png_restores_deepcache(tmp_path, tiny_checkpoint):
    from PIL.PngImagePlugin import PngInfo

    from optimizedSD.arguments import parse_args

    info = PngInfo()
    info.add_text("parameters", "a castle\nSteps: 10, Sampler: DDIM, CFG scale: 6, Seed: 5, Size: 64x64, "
                                "DeepCache: 3, DeepCache branch: 2, RNG: CPU")
    Image.new("RGB", (64, 64)).save(tmp_path / "old.png", pnginfo=info)
    request = parse_args(["--from_png", str(tmp_path / "old.png"), "--ckpt", str(tiny_checkpoint)], "txt2img")
    assert (request.deepcache, request.deepcache_branch) == (3, 2)
    plain = parse_args(["--prompt", "x", "--ckpt", str(tiny_checkpoint)], "txt2img")
    assert (plain.deepcache, plain.deepcache_branch) == (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--unet_bs", "1"], ["--vram", "low", "--unet_bs", "1"], ["--vram", "medium"]],
                         ids=["unet_bs", "low-unet_bs", "medium"])
def test_deepcache_is_the_same_in_chunks_and_modes(model_files, tiny_config_path, tmp_path, extra):
    """Each chunk of ``--unet_bs`` (and each mode) keeps and reuses its own features: the same image."""
    _, ckpt = model_files
    reference, _, _ = _ours(ckpt, tiny_config_path, tmp_path / "ref", "ddim", ["--deepcache", "3"])
    other, _, _ = _ours(ckpt, tiny_config_path, tmp_path / "other", "ddim", ["--deepcache", "3", *extra])
    assert np.abs(reference - other).mean() <= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("sampler, extra", [("heun", []), ("dpmpp_2s_a", ["--tome", "0.5"]),
                                            ("euler_a", ["--quantize", "int8"])])
def test_deepcache_runs_with_two_call_samplers_tome_and_int8(model_files, tiny_config_path, tmp_path, sampler, extra):
    _, ckpt = model_files
    cached, parameters, _ = _ours(ckpt, tiny_config_path, tmp_path / "dc", sampler, ["--deepcache", "2", *extra])
    plain, _, _ = _ours(ckpt, tiny_config_path, tmp_path / "plain", sampler, extra)
    assert cached.std() > 1 and "DeepCache: 2" in parameters
    assert np.abs(cached - plain).mean() > 0.5  # the shallow steps ran
