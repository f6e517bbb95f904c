"""``--lora`` through the command line: the image equals diffusers' pipeline with the same LoRA fused, the PNG
carries the webui's ``Lora hashes``, the embedding cache keeps text-encoder LoRAs apart, bad files are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.config import load_model_config
from ldm.loading.lora import lora_short_hash
from ldm.samplers.noise import SeededNoise
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_txt2img
from optimizedSD.infotext import read_parameters
from tests import lora_files
from tests.test_cli_vs_diffusers import TINY_CONFIG, diffusers_pipeline_from_checkpoint

SEED, PROMPT, STEPS, SCALE = 31, "a photograph of an astronaut riding a horse", 4, 7.5


def run_cli(tmp_path, ckpt, name, *extra):
    out = tmp_path / name
    argv = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--precision", "full",
            "--outdir", str(out), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", str(SEED),
            "--sampler", "ddim", "--ddim_steps", str(STEPS), "--scale", str(SCALE), "--no-watermark", "--skip_grid",
            *extra]
    assert optimized_txt2img.main(argv) == 0
    (path,) = list(out.rglob("seed_*.png"))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64), read_parameters(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli_lora")
    state = random_state_dict(load_model_config(TINY_CONFIG), seed=2024)
    ckpt = save_checkpoint(state, tmp_path / "random.safetensors")
    pipe = diffusers_pipeline_from_checkpoint(state, TINY_CONFIG)
    unet_layers, text_layers = lora_files.layers(pipe.unet), lora_files.layers(pipe.text_encoder)
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    lora = lora_files.save(lora_files.kohya_lora(unet_layers, text_layers, 7), lora_dir / "style.safetensors")
    return tmp_path, state, ckpt, lora


def test_cli_image_with_lora_matches_diffusers_fused_lora(files, tmp_path):
    _, state, ckpt, lora = files
    ours, parameters = run_cli(tmp_path, ckpt, "lora", "--prompt", PROMPT, "--lora", f"{lora}:0.8")
    plain, _ = run_cli(tmp_path, ckpt, "plain", "--prompt", PROMPT)

    pipe = diffusers_pipeline_from_checkpoint(state, TINY_CONFIG)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.fuse_lora(lora_scale=0.8)
    latents = SeededNoise([SEED]).initial((4, 8, 8))
    with torch.no_grad():
        theirs = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, guidance_scale=SCALE, eta=0.0,
                      latents=latents, output_type="np").images[0]
    theirs = np.round(theirs * 255).astype(np.float64)

    print(f"mean |ours - diffusers| {np.abs(ours - theirs).mean():.3f} levels, LoRA effect {np.abs(ours - plain).mean():.1f}")
    assert np.abs(ours - plain).mean() > 5  # the LoRA changes the picture
    assert np.abs(ours - theirs).mean() <= 1.0, np.abs(ours - theirs).mean()
    assert f'Lora hashes: "style: {lora_short_hash(lora)}"' in parameters


def test_embedding_cache_key_includes_text_encoder_loras(files, tmp_path):
    """A LoRA that changes the text encoder gets its own cache entries; a UNet-only one reuses the plain ones."""
    _, _, ckpt, lora = files
    unet_only = lora_files.save(
        {k: v for k, v in load_file(str(lora)).items() if k.startswith("lora_unet_")},
        tmp_path / "unet_only.safetensors",
    )
    cache = tmp_path / "cache"
    entries = []
    for name, extra in (("plain", []), ("te", ["--lora", f"{lora}:0.5"]), ("te_again", ["--lora", f"{lora}:0.5"]),
                        ("unet", ["--lora", str(unet_only)]), ("te_other_weight", ["--lora", f"{lora}:0.25"])):
        run_cli(tmp_path, ckpt, name, "--prompt", PROMPT, "--ddim_steps", "1", "--embedding_cache", str(cache), *extra)
        entries.append(len(list(cache.iterdir())))
    assert entries == [2, 4, 4, 4, 6]  # prompt + negative prompt per distinct text-encoder state


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.safetensors", "no such file"),
    (lambda d: lora_files.save({"lora_unet_x.lora_down.weight": torch.ones(1, 1)}, d / "sdxl.safetensors"), "none of its 1 keys"),
])
def test_bad_lora_is_one_line_and_exit_2(files, tmp_path, capsys, make, message):
    _, _, ckpt, _ = files
    argv = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(tmp_path / "o"),
            "--H", "64", "--W", "64", "--n_samples", "1", "--ddim_steps", "1", "--lora", str(make(tmp_path))]
    assert optimized_txt2img.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_prompt_tag_is_the_lora_flag_and_from_png_restores_it(files, tmp_path):
    """``<lora:style:0.8>`` in a webui-syntax prompt: the image of ``--lora style.safetensors:0.8`` (which equals
    diffusers' fused LoRA, above), the tag kept in the metadata's prompt, and ``--from_png`` gives the image
    and its metadata again."""
    _, _, ckpt, lora = files
    lora_dir = ["--lora_dir", str(lora.parent)]
    tagged, parameters = run_cli(tmp_path, ckpt, "tag", "--prompt_syntax", "webui", "--prompt", f"{PROMPT} <lora:style:0.8>",
                                 *lora_dir)
    flagged, flagged_parameters = run_cli(tmp_path, ckpt, "flag", "--prompt_syntax", "webui", "--prompt", PROMPT,
                                          "--lora", f"{lora}:0.8")
    assert np.array_equal(tagged, flagged)
    assert parameters == flagged_parameters  # --lora is recorded as the webui records a LoRA it adds: a tag
    assert parameters.startswith(f"{PROMPT} <lora:style:0.8>\n")
    assert f'Lora hashes: "style: {lora_short_hash(lora)}"' in parameters

    (source,) = list((tmp_path / "tag").rglob("seed_*.png"))
    again, again_parameters = run_cli(tmp_path, ckpt, "again", "--from_png", str(source), *lora_dir)
    assert np.array_equal(again, tagged) and again_parameters == parameters
    plain, _ = run_cli(tmp_path, ckpt, "without", "--from_png", str(source), "--lora_dir", str(tmp_path / "none"))
    assert np.abs(plain - tagged).mean() > 5  # the LoRA not found: named in the warning, the image without it


@pytest.mark.parametrize("prompts, message", [
    (["a cat <lora:style:0.5>", "a dog <lora:style:0.7>"], "the prompts name different LoRAs"),
    (["a cat <lora:nowhere>"], "no nowhere.safetensors"),
    (["a cat <lora:style:1:0.5>"], "only <lora:NAME> and <lora:NAME:WEIGHT>"),
])
def test_prompt_tags_that_cannot_be_honoured_are_one_line(files, tmp_path, capsys, prompts, message):
    _, _, ckpt, lora = files
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    argv = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(tmp_path / "o"),
            "--H", "64", "--W", "64", "--n_samples", "1", "--ddim_steps", "1", "--prompt_syntax", "webui",
            "--from-file", str(prompts_file), "--lora_dir", str(lora.parent)]
    assert optimized_txt2img.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
