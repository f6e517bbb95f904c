"""The HTTP server end to end, through the ``webuiapi`` client (the package many programs use to talk to
AUTOMATIC1111's webui): a tiny random checkpoint, 64 x 64 images, 2 steps.

Reference: the scripts themselves. A server image must equal the image ``optimized_txt2img.py`` /
``optimized_inpaint.py`` writes for the same settings (pixels within 1 of 255, the same ``parameters`` text),
since the server runs the scripts' run on a kept model; the webui's own meanings of the fields (seed -1, the
grid first, ``info``'s seeds) are checked against what the webui v1.10 answers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image, ImageDraw

from ldm.config import load_model_config
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_inpaint, optimized_txt2img
from optimizedSD.infotext import read_parameters
from tests.server_helpers import TINY_CONFIG, running_server, tiny_server_argv

PROMPT = "a (red:1.2) fox in the snow"
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A --ckpt_dir with two tiny checkpoints of different weights."""
    folder = tmp_path_factory.mktemp("server_models")
    config = load_model_config(TINY_CONFIG)
    save_checkpoint(random_state_dict(config, seed=1234), folder / "alpha.safetensors")
    save_checkpoint(random_state_dict(config, seed=99), folder / "beta.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(models):
    with running_server(tiny_server_argv(models / "alpha.safetensors", "--ckpt_dir", str(models),
                                         "--no-watermark")) as running:
        yield running


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def script_images(tmp_path: Path, script, *argv: str) -> list[Path]:
    assert script.main([*argv, "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(tmp_path),
                        "--no-watermark", "--prompt_syntax", "webui", "--skip_grid", "--format", "png"]) == 0
    return sorted(p for p in tmp_path.rglob("seed_*.png"))


def pixels(image: Image.Image | Path) -> np.ndarray:
    image = Image.open(image) if isinstance(image, Path) else image
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_txt2img_equals_the_script_and_answers_as_the_webui(api, models, tmp_path):
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=123, steps=2, cfg_scale=6.5, width=64,
                         height=64, sampler_name="Euler a", batch_size=2)
    assert len(result.images) == 3 and result.images[0].size == (134, 68)  # the grid first, as the webui
    assert result.info["all_seeds"] == [123, 124] and result.info["seed"] == 123
    assert result.info["sampler_name"] == "Euler a" and len(result.info["infotexts"]) == 2
    assert result.parameters["prompt"] == PROMPT
    files = script_images(tmp_path, optimized_txt2img, "--ckpt", str(models / "alpha.safetensors"), "--prompt", PROMPT,
                          "--negative_prompt", NEGATIVE, "--seed", "123", "--ddim_steps", "2", "--scale", "6.5",
                          "--H", "64", "--W", "64", "--sampler", "Euler a", "--n_samples", "2", "--rng", "cpu")
    assert len(files) == 2
    for served, written, text in zip(result.images[1:], files, result.info["infotexts"]):
        assert np.abs(pixels(served) - pixels(written)).max() <= 1
        assert served.info["parameters"] == read_parameters(written) == text


def test_random_seed_and_png_info(api):
    result = api.txt2img(prompt="a boat", seed=-1, steps=1, width=64, height=64, sampler_name="DDIM")
    seed = result.info["seed"]
    assert 0 <= seed < 2**32 and len(result.images) == 1
    info = api.png_info(result.images[0])
    assert info.info == result.info["infotexts"][0]
    assert info.parameters["Prompt"] == "a boat" and info.parameters["Seed"] == str(seed)
    assert info.parameters["Size-1"] == "64" and info.parameters["Sampler"] == "DDIM"


def write_init_and_mask(folder: Path) -> tuple[Image.Image, Image.Image]:
    init = Image.new("RGB", (64, 64), (30, 120, 200))
    ImageDraw.Draw(init).ellipse((10, 10, 50, 50), fill=(220, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    init.save(folder / "init.png")
    mask.save(folder / "mask.png")
    return init, mask


@pytest.mark.parametrize(("full_res", "fill", "flags"), [
    (True, 1, ("--inpaint_area", "only_masked", "--only_masked_padding", "0", "--masked_content", "original")),
    (False, 0, ("--inpaint_area", "whole", "--masked_content", "fill")),
])
def test_img2img_inpainting_equals_the_script(api, models, tmp_path, full_res, fill, flags):
    """webuiapi sends the webui's defaults: Only masked (``inpaint_full_res``) with padding 0, Masked content
    fill (``inpainting_fill`` 0); both are the scripts' ``--inpaint_area``/``--masked_content``."""
    init, mask = write_init_and_mask(tmp_path)
    result = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=77, steps=3, cfg_scale=7,
                         denoising_strength=0.6, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras",
                         mask_blur=2, inpainting_fill=fill, inpaint_full_res=full_res)
    assert len(result.images) == 1 and result.info["denoising_strength"] == 0.6
    files = script_images(tmp_path / "out", optimized_inpaint, "--ckpt", str(models / "alpha.safetensors"),
                          "--prompt", PROMPT, "--init-img", str(tmp_path / "init.png"), "--mask",
                          str(tmp_path / "mask.png"), "--mask_blur", "2", "--strength", "0.6", "--img2img_steps",
                          "webui", "--seed", "77", "--ddim_steps", "3", "--scale", "7", "--H", "64", "--W", "64",
                          "--sampler", "DPM++ 2M Karras", "--n_samples", "1", "--rng", "cpu", *flags)
    assert np.abs(pixels(result.images[0]) - pixels(files[0])).max() <= 1
    assert result.images[0].info["parameters"] == read_parameters(files[0])


def test_txt2img_hires_fix_equals_the_script(api, models, tmp_path):
    """``enable_hr`` and the ``hr_*`` fields are the scripts' ``--hires_*`` flags."""
    result = api.txt2img(prompt=PROMPT, seed=31, steps=3, cfg_scale=6, width=64, height=64, sampler_name="Euler a",
                         enable_hr=True, hr_scale=2, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2,
                         denoising_strength=0.55, hr_sampler_name="DPM++ 2M", hr_prompt="a red cube")
    assert result.images[0].size == (128, 128)
    files = script_images(tmp_path / "out", optimized_txt2img, "--ckpt", str(models / "alpha.safetensors"),
                          "--prompt", PROMPT, "--seed", "31", "--ddim_steps", "3", "--scale", "6", "--H", "64",
                          "--W", "64", "--sampler", "Euler a", "--n_samples", "1", "--rng", "cpu", "--hires_scale",
                          "2", "--hires_upscaler", "latent-bicubic", "--hires_steps", "2", "--hires_strength", "0.55",
                          "--hires_sampler", "DPM++ 2M", "--hires_prompt", "a red cube")
    assert np.abs(pixels(result.images[0]) - pixels(files[0])).max() <= 1
    assert result.images[0].info["parameters"] == read_parameters(files[0])
    assert "Hires upscale: 2" in read_parameters(files[0])


def test_listings_in_the_webuis_shapes(api, models):
    entries = api.get_sd_models()
    assert [model["title"] for model in entries] == ["alpha.safetensors", "beta.safetensors"]
    alpha = hashlib.sha256((models / "alpha.safetensors").read_bytes()).hexdigest()
    assert entries[0]["sha256"] == alpha and entries[0]["hash"] == alpha[:8]  # the loaded one's
    assert entries[1]["sha256"] is None and entries[1]["model_name"] == "beta"  # not read until it is used
    samplers = {s["name"]: s["aliases"] for s in api.get_samplers()}
    assert "DPM++ 2M" in samplers and "dpmpp_2m" in samplers["DPM++ 2M"]
    assert {"automatic", "karras"} <= {s["name"] for s in api.get_schedulers()}
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "alpha.safetensors" and options["CLIP_stop_at_last_layers"] == 1
    assert api.get_scripts() == {"txt2img": [], "img2img": []} and api.get_sd_vae() == []
    memory = api.get_memory()
    assert memory["ram"]["used"] > 0 and memory["ram"]["total"] >= memory["ram"]["used"]


def test_switching_checkpoints(api, server):
    before = api.txt2img(prompt="a house", seed=3, steps=1, width=64, height=64, sampler_name="Euler")
    api.util_set_model("beta")
    assert api.util_get_current_model() == "beta.safetensors"
    after = api.txt2img(prompt="a house", seed=3, steps=1, width=64, height=64, sampler_name="Euler")
    assert "Model: beta" in after.info["infotexts"][0]
    assert np.abs(pixels(before.image) - pixels(after.image)).max() > 10  # other weights, another picture
    once = api.txt2img(prompt="a house", seed=3, steps=1, width=64, height=64, sampler_name="Euler",
                       override_settings={"sd_model_checkpoint": "alpha.safetensors"})
    assert np.abs(pixels(before.image) - pixels(once.image)).max() <= 1
    api.util_set_model("alpha")


def test_clip_skip_and_ensd_options_are_honoured(api, models, tmp_path):
    api.set_options({"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337})
    try:
        result = api.txt2img(prompt="a tree", seed=9, steps=2, width=64, height=64, sampler_name="Euler a")
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0})
    text = result.info["infotexts"][0]
    assert "Clip skip: 2" in text and "ENSD: 31337" in text
    files = script_images(tmp_path, optimized_txt2img, "--ckpt", str(models / "alpha.safetensors"), "--prompt",
                          "a tree", "--seed", "9", "--ddim_steps", "2", "--scale", "7", "--H", "64", "--W", "64",
                          "--sampler", "euler_a", "--n_samples", "1", "--clip_skip", "2", "--ensd", "31337")
    assert np.abs(pixels(result.image) - pixels(files[0])).max() <= 1


def test_raw_json_answers_and_data_urls(server, caplog):
    image = Image.new("RGB", (64, 64), (100, 150, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    answer = requests.post(f"{server.url}/sdapi/v1/img2img", json={
        "init_images": [data_url], "prompt": "a wall", "seed": 5, "steps": 2, "width": 64, "height": 64,
        "denoising_strength": 0.5, "sampler_name": "Euler", "include_init_images": True,
        "alwayson_scripts": {"ControlNet": {"args": [{"x": 1}]}}},
        timeout=300)
    assert answer.status_code == 200, answer.text
    assert "not done by this server, ignored: alwayson_scripts" in caplog.text  # ControlNet with arguments
    body = answer.json()
    assert body["parameters"]["init_images"] is None and body["parameters"]["prompt"] == "a wall"
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    assert json.loads(body["info"])["all_seeds"] == [5]
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (64, 64)
    assert len(body["images"]) == 2 and base64.b64decode(body["images"][1]) == buffer.getvalue()  # the init image


def test_from_png_of_a_server_image_gives_the_same_image(api, models, tmp_path):
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4242, steps=3, cfg_scale=5, width=64,
                         height=64, sampler_name="DPM++ 2M", scheduler="Karras", subseed=17, subseed_strength=0.3)
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(result.json["images"][0]))
    argv = ["--ckpt", str(models / "alpha.safetensors"), "--config", str(TINY_CONFIG), "--from_png", str(served),
            "--n_samples", "1", "--device", "cpu", "--outdir", str(tmp_path / "again"), "--no-watermark", "--skip_grid"]
    assert optimized_txt2img.main(argv) == 0  # everything else from the image's parameters
    files = sorted((tmp_path / "again").rglob("seed_*.png"))
    assert np.abs(pixels(result.image) - pixels(files[0])).max() <= 1
    assert read_parameters(files[0]) == read_parameters(served)


def test_randn_source_nv_is_the_scripts_gpu_noise(api, models, tmp_path):
    api.set_options({"randn_source": "NV"})
    try:
        result = api.txt2img(prompt="a hill", seed=12, steps=2, width=64, height=64, sampler_name="Euler a")
    finally:
        api.set_options({"randn_source": "GPU"})
    assert "RNG: NV" in result.info["infotexts"][0]
    files = script_images(tmp_path, optimized_txt2img, "--ckpt", str(models / "alpha.safetensors"), "--prompt",
                          "a hill", "--seed", "12", "--ddim_steps", "2", "--scale", "7", "--H", "64", "--W", "64",
                          "--sampler", "euler_a", "--n_samples", "1", "--rng", "gpu")
    assert np.abs(pixels(result.image) - pixels(files[0])).max() <= 1
