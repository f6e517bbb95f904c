"""The server's ControlNet API (the sd-webui-controlnet extension's ``alwayson_scripts.controlnet`` units and its
``/controlnet/*`` listings) through the ``webuiapi`` client's ``ControlNetUnit``: a tiny random checkpoint, tiny
random-weight ControlNets in ``--control_dir``, 64 x 64 images, 3 steps.

Reference: the scripts. A server image must equal what ``optimized_txt2img.py`` / ``optimized_img2img.py`` write
with the same ``--control_*`` flags (pixels within 1 of 255, the same ``parameters`` text, the extension's
``ControlNet 0`` field included), since the server runs the scripts' run with the request's ControlNets placed on
its kept model.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image

from ldm.config import load_model_config
from ldm.control.files import webui_model_hash
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_img2img, optimized_inpaint, optimized_txt2img
from optimizedSD.infotext import read_parameters
from tests import lora_files
from tests.control_files import hint_png, random_control_state, save_v11
from tests.server_helpers import TINY_CONFIG, running_server, tiny_server_argv
from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint

PROMPT = "a fox in the snow"
COMMON = dict(prompt=PROMPT, seed=42, steps=3, cfg_scale=6.0, width=64, height=64, sampler_name="Euler")
SCRIPT_COMMON = ["--prompt", PROMPT, "--seed", "42", "--ddim_steps", "3", "--scale", "6.0", "--H", "64", "--W", "64",
                 "--sampler", "Euler", "--rng", "cpu"]


def fresh() -> dict:
    """COMMON for a webuiapi call: webuiapi writes the units into its default ``alwayson_scripts={}`` argument (one
    dict for every call in the process), so every call passes its own, or later calls (other tests' too) would
    send these units again."""
    return {**COMMON, "alwayson_scripts": {}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("server_control")
    state = random_state_dict(load_model_config(TINY_CONFIG), seed=1234)
    save_checkpoint(state, folder / "alpha.safetensors")
    pipe = diffusers_pipeline_from_checkpoint(state, TINY_CONFIG)
    (folder / "loras").mkdir()
    lora_files.save(lora_files.kohya_lora(lora_files.layers(pipe.unet), lora_files.layers(pipe.text_encoder), 7),
                    folder / "loras" / "style.safetensors")
    library = folder / "ControlNet"
    library.mkdir()
    save_v11(random_control_state(TINY_CONFIG, seed=7), library / "control_v11p_sd15_canny.pth")
    save_v11(random_control_state(TINY_CONFIG, seed=8), library / "control_v11p_sd15_lineart.safetensors")
    save_v11({"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}, library / "not_a_controlnet.safetensors")
    return {"ckpt": folder / "alpha.safetensors", "library": library, "loras": folder / "loras", "hint": hint_png(folder / "hint.png"),
            "wide": hint_png(folder / "wide.png", width=96, height=64, seed=5),
            "canny": library / "control_v11p_sd15_canny.pth", "lineart": library / "control_v11p_sd15_lineart.safetensors"}


@pytest.fixture(scope="module")
def server(files):
    argv = tiny_server_argv(files["ckpt"], "--no-watermark", "--control_dir", str(files["library"]), "--lora_dir",
                            str(files["loras"]))
    with running_server(argv) as running:
        yield running


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def script_image(tmp_path: Path, script, *argv: str) -> Path:
    assert script.main([*argv, "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(tmp_path),
                        "--no-watermark", "--prompt_syntax", "webui", "--skip_grid", "--format", "png",
                        "--n_samples", "1"]) == 0
    (image,) = (path for path in tmp_path.rglob("seed_*.png") if "-control" not in path.name)
    return image


def pixels(image: Image.Image | Path) -> np.ndarray:
    image = Image.open(image) if isinstance(image, Path) else image
    return np.asarray(image.convert("RGB")).astype(np.int16)


def assert_same(served: Image.Image, written: Path) -> None:
    assert np.abs(pixels(served) - pixels(written)).max() <= 1
    assert served.info["parameters"] == read_parameters(written)


def named(path: Path) -> str:
    return f"{path.stem} [{webui_model_hash(path)}]"


def test_one_canny_unit_equals_the_script(api, server, files, tmp_path):
    unit = webuiapi.ControlNetUnit(image=Image.open(files["hint"]), module="canny", model=named(files["canny"]),
                                   weight=0.6, guidance_start=0.2, guidance_end=0.8, threshold_a=60, threshold_b=180,
                                   resize_mode="Crop and Resize")
    result = api.txt2img(**fresh(), controlnet_units=[unit])
    written = script_image(tmp_path, optimized_txt2img, "--ckpt", str(files["ckpt"]), *SCRIPT_COMMON,
                           "--control_model", str(files["canny"]), "--control_image", str(files["hint"]),
                           "--control_weight", "0.6", "--control_start", "0.2", "--control_end", "0.8",
                           "--control_preprocess", "canny", "--canny_low", "60", "--canny_high", "180",
                           "--save_control_map")
    assert_same(result.image, written)
    assert len(result.images) == 2  # the extension appends each unit's detected map
    assert np.array_equal(pixels(result.images[1]), pixels(written.with_name(f"{written.stem}-control0.png")))
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [' in result.info["infotexts"][0]
    assert result.info["extra_generation_params"]["ControlNet 0"].startswith("Module: canny, Model: control_v11p")
    reads, loads = server.service.worker.holder.control_reads, server.service.worker.holder.loads
    again = api.txt2img(**fresh(), controlnet_units=[unit])  # the same file: kept, not read again
    assert np.array_equal(pixels(again.image), pixels(result.image))
    assert server.service.worker.holder.control_reads == reads and server.service.worker.holder.loads == loads


def test_two_units_by_name_on_img2img_equal_the_script(api, files, tmp_path):
    init = Image.open(files["hint"])
    units = [webuiapi.ControlNetUnit(image=init, module="invert", model="LINEART", weight=0.8),  # as the extension finds it
             webuiapi.ControlNetUnit(image=Image.open(files["wide"]), module="none", model=named(files["canny"]),
                                     guidance_end=0.5, resize_mode="Crop and Resize")]
    result = api.img2img(images=[init], denoising_strength=0.6, controlnet_units=units, **fresh())
    written = script_image(tmp_path, optimized_img2img, "--ckpt", str(files["ckpt"]), *SCRIPT_COMMON,
                           "--init-img", str(files["hint"]), "--strength", "0.6", "--img2img_steps", "webui",
                           "--control_model", str(files["lineart"]), "--control_image", str(files["hint"]),
                           "--control_weight", "0.8", "--control_end", "1", "--control_preprocess", "invert",
                           "--control_model", str(files["canny"]), "--control_image", str(files["wide"]),
                           "--control_end", "0.5", "--control_preprocess", "none")  # the n-th of each flag: n-th unit
    assert_same(result.image, written)
    assert "ControlNet 1: " in result.info["infotexts"][0] and len(result.images) == 3


def test_inpainting_with_a_unit_without_image_takes_the_init_image(api, files, tmp_path):
    """As the extension: an img2img unit without its own image is given the init image."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    unit = webuiapi.ControlNetUnit(module="invert", model="control_v11p_sd15_canny", weight=0.9)
    result = api.img2img(images=[Image.open(files["hint"])], mask_image=mask, denoising_strength=0.7, mask_blur=2,
                         inpaint_full_res=False, controlnet_units=[unit], **fresh())
    written = script_image(tmp_path / "out", optimized_inpaint, "--ckpt", str(files["ckpt"]), *SCRIPT_COMMON,
                           "--init-img", str(files["hint"]), "--mask", str(tmp_path / "mask.png"), "--mask_blur", "2",
                           "--strength", "0.7", "--img2img_steps", "webui", "--inpaint_area", "whole",
                           "--masked_content", "fill", "--control_model", str(files["canny"]), "--control_image",
                           str(files["hint"]), "--control_weight", "0.9", "--control_preprocess", "invert")
    assert_same(result.image, written)


def test_a_prompt_lora_and_a_unit_equal_the_script(api, files, tmp_path):
    """A LoRA set change sets the memory mode up again: the ControlNet is placed again under the new one."""
    unit = webuiapi.ControlNetUnit(image=Image.open(files["hint"]), module="none", model="control_v11p_sd15_canny")
    flags = ("--control_model", str(files["canny"]), "--control_image", str(files["hint"]))
    served = []
    for k, prompt in enumerate([PROMPT + " <lora:style:0.8>", PROMPT]):
        served.append(api.txt2img(**{**fresh(), "prompt": prompt}, controlnet_units=[unit]).image)
        argv = [*SCRIPT_COMMON, "--lora_dir", str(files["loras"]), *flags]
        argv[argv.index(PROMPT)] = prompt
        assert_same(served[-1], script_image(tmp_path / str(k), optimized_txt2img, "--ckpt", str(files["ckpt"]), *argv))
    assert not np.array_equal(pixels(served[0]), pixels(served[1]))  # the LoRA changed the image


def test_a_disabled_unit_gives_the_plain_image(api, files, tmp_path):
    unit = webuiapi.ControlNetUnit(image=Image.open(files["hint"]), module="canny", model=named(files["canny"]),
                                   enabled=False)
    result = api.txt2img(**fresh(), controlnet_units=[unit])
    plain = api.txt2img(**fresh())
    assert np.array_equal(pixels(result.image), pixels(plain.image))
    assert "ControlNet" not in result.info["infotexts"][0]
    assert_same(result.image, script_image(tmp_path, optimized_txt2img, "--ckpt", str(files["ckpt"]), *SCRIPT_COMMON))


def test_listings_in_the_extensions_shapes(server, files):
    models = requests.get(f"{server.url}/controlnet/model_list", timeout=30).json()
    assert models == {"model_list": [named(files["canny"]), named(files["lineart"]),
                                     named(files["library"] / "not_a_controlnet.safetensors")]}
    modules = requests.get(f"{server.url}/controlnet/module_list", timeout=30).json()
    assert modules["module_list"] == ["none", "invert", "canny"]
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]] == [512, 100, 200]
    assert requests.get(f"{server.url}/controlnet/version", timeout=30).json() == {"version": 2}


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.mark.parametrize("unit, words", [
    ({"module": "openpose", "model": "control_v11p_sd15_canny"}, ["openpose", "none, invert, canny"]),
    ({"module": "none", "model": "control_v11p_sd15_depth [12345678]"}, ["not in", "control_v11p_sd15_canny ["]),
    ({"module": "none", "model": "None"}, ["no model"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "control_mode": 2}, ["control_mode", "Balanced"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "resize_mode": "Just Resize", "image": "WIDE"},
     ["Just Resize", "96x64", "Crop and Resize"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "image": "not base64!"}, ["controlnet unit 0", "base64"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "image": None}, ["controlnet unit 0", "no image"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "weight": "heavy"}, ["weight", "number"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "guidance_start": 0.9, "guidance_end": 0.1},
     ["guidance_start", "guidance_end"]),
    ({"module": "none", "model": "not_a_controlnet"}, ["not_a_controlnet.safetensors", "not a ControlNet"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "image": [1, 2]}, ["image", "base64"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "resize_mode": [1]}, ["resize_mode", "Crop and Resize"]),
    ({"module": "none", "model": "control_v11p_sd15_canny", "mask": "abc"}, ["mask", "not supported"]),
])
def test_bad_units_are_one_line_422(server, files, unit, words):
    unit = {"image": b64(files["hint"]), **unit}
    if unit.get("image") == "WIDE":
        unit["image"] = b64(files["wide"])
    body = {**COMMON, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert answer.status_code == 422, answer.text
    assert "\n" not in answer.text and all(word in json.loads(answer.text)["detail"] for word in words), answer.text


def test_old_input_image_field_and_same_ratio_just_resize(server, files):
    unit = {"input_image": b64(files["hint"]), "module": "none", "model": "control_v11p_sd15_canny",
            "resize_mode": 0}
    body = {**COMMON, "alwayson_scripts": {"ControlNet": {"args": [unit]}},
            "override_settings": {"control_net_no_detectmap": True}}
    answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1  # no map appended
    assert "ControlNet 0" in json.loads(answer.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("vram", ["low", "medium"])
def test_memory_modes_with_the_nets_kept_between_requests(files, tmp_path, vram):
    """The ControlNets go under the kept model's memory mode; after a request without them and back, the image
    is the same, the file not read again."""
    argv = tiny_server_argv(files["ckpt"], "--no-watermark", "--control_dir", str(files["library"]), "--vram", vram)
    unit = webuiapi.ControlNetUnit(image=Image.open(files["hint"]), module="invert", model="control_v11p_sd15_canny",
                                   weight=0.7, resize_mode="Crop and Resize")
    with running_server(argv) as running:
        api = webuiapi.WebUIApi(port=running.port)
        first = api.txt2img(**fresh(), controlnet_units=[unit])
        plain = api.txt2img(**fresh())
        again = api.txt2img(**fresh(), controlnet_units=[unit])
        holder = running.service.worker.holder
        assert holder.model.residency.mode == vram and holder.control_reads == 1 and holder.loads == 1
    written = script_image(tmp_path, optimized_txt2img, "--ckpt", str(files["ckpt"]), *SCRIPT_COMMON, "--vram", vram,
                           "--control_model", str(files["canny"]), "--control_image", str(files["hint"]),
                           "--control_weight", "0.7", "--control_preprocess", "invert")
    assert_same(first.image, written)
    assert np.array_equal(pixels(again.image), pixels(first.image))
    assert not np.array_equal(pixels(plain.image), pixels(first.image)) and "ControlNet" not in plain.info["infotexts"][0]


@pytest.mark.parametrize("path, fields, words", [
    ("txt2img", {"enable_hr": True}, ["controlnet model", "hires fix", "not supported"]),
    ("img2img", {"mask": "MASK", "inpaint_full_res": True}, ["controlnet model", "inpaint_full_res", "not supported"]),
])
def test_controlnet_with_what_the_scripts_do_not_combine_is_one_line_422(server, files, path, fields, words):
    unit = {"image": b64(files["hint"]), "module": "none", "model": "control_v11p_sd15_canny"}
    body = {**COMMON, **fields, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    if path == "img2img":
        body.update(init_images=[b64(files["hint"])], mask=b64(files["hint"]))
    answer = requests.post(f"{server.url}/sdapi/v1/{path}", json=body, timeout=60)
    assert answer.status_code == 422 and all(word in answer.json()["detail"] for word in words), answer.text
