"""The webui's language through the command line: its prompt syntax, a long prompt, clip skip, an embedding,
the metadata read back by the webui's reader, and ``--from_png`` making the same pixels again."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from optimizedSD import optimized_txt2img
from optimizedSD.arguments import parse_args
from tests.conftest import TINY_CONFIG
from tests.test_infotext import webui_parse_generation_parameters, webui_read_info_from_image

COMMON = ["--config", str(TINY_CONFIG), "--device", "cpu", "--n_samples", "1", "--no-watermark"]
LONG_PROMPT = "a (red:1.3) castle, [blurry], my-style, " + ", ".join(["highly detailed oil painting"] * 20)


def only_image(folder):
    paths = [p for p in folder.rglob("seed_*") if p.is_file()]
    assert len(paths) == 1, paths
    return paths[0]


def test_webui_features_written_read_back_and_reproduced_by_from_png(tiny_checkpoint, tmp_path):
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))},
                "name": "my-style", "step": 100}, embeddings / "my-style.pt")
    first = tmp_path / "first"
    assert optimized_txt2img.main([
        "--ckpt", str(tiny_checkpoint), *COMMON, "--outdir", str(first), "--H", "64", "--W", "64",
        "--ddim_steps", "3", "--seed", "5", "--sampler", "dpm2_a", "--scale", "6.5", "--prompt_syntax", "webui",
        "--clip_skip", "2", "--embeddings_dir", str(embeddings), "--prompt", LONG_PROMPT,
        "--negative_prompt", "lowres, (my-style:0.8)", "--format", "jpg"]) == 0
    image_path = only_image(first)
    with Image.open(image_path) as image:
        fields = webui_parse_generation_parameters(webui_read_info_from_image(image))
        pixels = np.asarray(image.convert("RGB")).copy()
    sha = hashlib.sha256((embeddings / "my-style.pt").read_bytes()).hexdigest()
    assert fields["Prompt"] == LONG_PROMPT  # the weights verbatim
    assert fields["Negative prompt"] == "lowres, (my-style:0.8)"
    assert {key: fields[key] for key in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size",
                                         "Clip skip", "RNG", "TI hashes", "Pad conds")} == {
        "Steps": "3", "Sampler": "DPM2 a", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "5",
        "Size": "64x64", "Clip skip": "2", "RNG": "CPU", "TI hashes": f"my-style: {sha[:12]}", "Pad conds": "True"}
    assert "Prompt syntax" not in fields  # the webui's own syntax needs no note
    with Image.open(first / "grid-0000.png") as grid:  # the grid carries its first image's parameters
        assert webui_read_info_from_image(grid) == webui_read_info_from_image(Image.open(image_path))

    again = tmp_path / "again"
    assert optimized_txt2img.main([
        "--ckpt", str(tiny_checkpoint), *COMMON, "--outdir", str(again), "--skip_grid", "--format", "jpg",
        "--embeddings_dir", str(embeddings), "--from_png", str(image_path)]) == 0
    again_path = only_image(again)
    assert again_path.name == image_path.name
    with Image.open(again_path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
    assert again_path.read_bytes() == image_path.read_bytes()


def _png_with(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_from_png_flags_win_and_what_cannot_be_honoured_is_one_warning(tmp_path, caplog):
    source = _png_with(tmp_path / "webui.png", (
        "a (cat:1.2), [dog]\nNegative prompt: blurry\nSteps: 28, Sampler: Euler a, CFG scale: 6, Seed: 42, "
        "Size: 512x768, Model hash: 6ce0161689, Clip skip: 2, Hires upscale: 2, Version: v1.10.1"))
    with caplog.at_level(logging.WARNING, logger="optimizedSD.arguments"):
        request = parse_args(["--from_png", str(source), "--ddim_steps", "7", "--seed=3"], "txt2img")
    assert (request.prompt, request.negative_prompt, request.prompt_syntax) == ("a (cat:1.2), [dog]", "blurry", "webui")
    assert (request.steps, request.seed) == (7, 3)  # given on the command line
    assert (request.sampler, request.scale, request.width, request.height, request.clip_skip) == ("euler_a", 6.0, 512, 768, 2)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "Hires upscale: 2" in warnings[0] and "RNG" not in warnings[0]
    assert request.rng == "gpu"  # no RNG field: the webui's GPU noise, which --rng gpu draws on any device


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("", "no generation parameters")])
def test_from_png_errors_are_one_line(tmp_path, content, message):
    from ldm.errors import UsageError

    path = tmp_path / "x.png"
    if content is not None:
        Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(UsageError, match=message):
        parse_args(["--from_png", str(path)], "txt2img")
