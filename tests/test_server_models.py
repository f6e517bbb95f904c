"""The kept model: LoRAs named in prompts merge on a copy and come out again without reading the checkpoint (images
equal the scripts' with the same LoRA, and the plain model's afterwards); switching checkpoints frees the old
model (host memory does not grow from switch to switch); ``/loras``, ``/embeddings``, ``/refresh-checkpoints``."""

from __future__ import annotations

import gc
import shutil
import weakref

import numpy as np
import pytest
import requests
import torch
import webuiapi
from safetensors.torch import save_file

from ldm.config import load_model_config
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_txt2img
from optimizedSD.server.listings import process_rss
from tests import lora_files
from tests.server_helpers import TINY_CONFIG, running_server, tiny_server_argv
from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint
from tests.test_server_api import pixels, script_images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two checkpoints, a LoRA folder with one kohya LoRA, an embeddings folder with one embedding."""
    root = tmp_path_factory.mktemp("server_models")
    config = load_model_config(TINY_CONFIG)
    state = random_state_dict(config, seed=2024)
    (root / "models").mkdir()
    save_checkpoint(state, root / "models" / "first.safetensors")
    save_checkpoint(random_state_dict(config, seed=7), root / "models" / "second.safetensors")
    pipe = diffusers_pipeline_from_checkpoint(state, TINY_CONFIG)
    (root / "loras").mkdir()
    lora_files.save(lora_files.kohya_lora(lora_files.layers(pipe.unet), lora_files.layers(pipe.text_encoder), 7),
                    root / "loras" / "style.safetensors")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, config.text.hidden_size)}, str(root / "embeddings" / "shiny.safetensors"))
    return root


@pytest.fixture(scope="module")
def server(folders):
    argv = tiny_server_argv(folders / "models" / "first.safetensors", "--ckpt_dir", str(folders / "models"),
                            "--lora_dir", str(folders / "loras"), "--embeddings_dir", str(folders / "embeddings"),
                            "--no-watermark")
    with running_server(argv) as running:
        yield running


def ask(api: webuiapi.WebUIApi, prompt: str):
    return api.txt2img(prompt=prompt, seed=21, steps=2, width=64, height=64, sampler_name="Euler", cfg_scale=7)


def test_prompt_loras_merge_on_a_copy_and_unmerge(server, folders, tmp_path):
    api = webuiapi.WebUIApi(port=server.port)
    holder = server.service.worker.holder
    plain = ask(api, "a castle")
    loads = holder.loads
    styled = ask(api, "a castle <lora:style:0.8>")
    assert "Lora hashes" in styled.info["infotexts"][0]
    files = script_images(tmp_path, optimized_txt2img, "--ckpt", str(folders / "models" / "first.safetensors"),
                          "--lora_dir", str(folders / "loras"), "--prompt", "a castle <lora:style:0.8>",
                          "--seed", "21", "--ddim_steps", "2", "--H", "64", "--W", "64", "--sampler", "euler",
                          "--n_samples", "1", "--scale", "7")
    assert np.abs(pixels(styled.image) - pixels(files[0])).max() <= 1
    assert np.abs(pixels(styled.image) - pixels(plain.image)).max() > 3  # the LoRA changed the picture
    again = ask(api, "a castle")
    assert np.array_equal(pixels(again.image), pixels(plain.image))  # the original weights, bit for bit
    assert holder.loads == loads  # no checkpoint read for either change
    assert [entry["name"] for entry in api.get_loras()] == ["style"]


def test_switching_checkpoints_frees_the_old_model(server):
    api = webuiapi.WebUIApi(port=server.port)
    holder = server.service.worker.holder
    ask(api, "a lake")
    first = weakref.ref(holder.model.sd)
    rss = []
    for round_ in range(6):
        api.util_set_model("second" if round_ % 2 == 0 else "first")
        gc.collect()
        rss.append(process_rss())
    assert first() is None  # the first model's objects are gone, not only unreferenced by the holder
    model_bytes = sum(p.numel() * p.element_size() for p in holder.model.sd.unet.parameters())
    assert rss[-1] - rss[1] < model_bytes, rss  # no model's worth of growth over four switches
    assert api.util_get_current_model() == "first.safetensors"


def test_embeddings_and_refresh(server, folders):
    api = webuiapi.WebUIApi(port=server.port)
    embeddings = api.get_embeddings()
    assert embeddings["loaded"]["shiny"]["vectors"] == 2 and embeddings["skipped"] == {}
    shutil.copy(folders / "models" / "second.safetensors", folders / "models" / "third.safetensors")
    assert "third.safetensors" not in api.util_get_model_names()
    requests.post(f"{server.url}/sdapi/v1/refresh-checkpoints", timeout=30)
    assert "third.safetensors" in api.util_get_model_names()
