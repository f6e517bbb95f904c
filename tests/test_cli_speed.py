"""``--tome`` and ``--quantize int8`` end to end through optimized_txt2img.py on the tiny random model."""

from __future__ import annotations

import pytest

from optimizedSD.arguments import SAMPLERS
from optimizedSD.infotext import read_parameters
from tests.test_cli_errors import expect_usage_error
from tests.test_cli_txt2img import optimized_txt2img, pixels, run, samples

SIZE = ["--H", "128", "--W", "128"]  # 16x16 latents: the full-resolution blocks have tokens to merge


def one_image(ckpt, outdir, *flags) -> tuple:
    assert run(ckpt, outdir, *SIZE, "--skip_grid", *flags) == 0
    (path,) = samples(outdir)
    return pixels(path), read_parameters(path)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_token_merging_with_every_sampler(tiny_checkpoint, tmp_path, sampler):
    image, text = one_image(tiny_checkpoint, tmp_path, "--sampler", sampler, "--tome", "0.5")
    assert ", Token merging ratio: 0.5," in text + "," and image.std() > 0  # other fields may follow (RNG)


def test_token_merging_changes_the_image_a_little(tiny_checkpoint, tmp_path):
    merged, _ = one_image(tiny_checkpoint, tmp_path / "tome", "--tome", "0.5")
    plain, text = one_image(tiny_checkpoint, tmp_path / "plain")
    assert "Token merging" not in text
    assert (merged != plain).any() and abs(merged - plain).mean() < 8  # levels of 255


def test_int8_and_token_merging_give_the_same_image_in_every_memory_mode(tiny_checkpoint, tmp_path):
    images = {
        mode: one_image(tiny_checkpoint, tmp_path / mode, "--quantize", "int8", "--tome", "0.5", "--vram", mode)[0]
        for mode in ("full", "medium", "low")
    }
    plain, _ = one_image(tiny_checkpoint, tmp_path / "plain", "--tome", "0.5")
    assert (images["full"] == images["medium"]).all() and (images["full"] == images["low"]).all()
    assert (images["full"] != plain).any() and abs(images["full"] - plain).mean() < 8


def test_same_seed_same_image_with_token_merging(tiny_checkpoint, tmp_path):
    first, _ = one_image(tiny_checkpoint, tmp_path / "a", "--tome", "0.75")
    second, _ = one_image(tiny_checkpoint, tmp_path / "b", "--tome", "0.75")
    assert (first == second).all()  # no random partition


@pytest.mark.parametrize("flags, fragment", [
    (["--tome", "0.8"], "--tome must be between 0 and 0.75"),
    (["--tome", "-0.1"], "--tome must be between 0 and 0.75"),
    (["--quantize", "int4"], "--quantize"),
])
def test_bad_values(tiny_checkpoint, tmp_path, capsys, flags, fragment):
    argv = ["--ckpt", str(tiny_checkpoint), "--device", "cpu", "--outdir", str(tmp_path), *flags]
    expect_usage_error(capsys, optimized_txt2img.main, argv, fragment)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
