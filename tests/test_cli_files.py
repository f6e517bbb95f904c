"""The scripts with --vae and with a diffusers folder as --ckpt: the image of the equivalent single file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoints.layout import VAE_PREFIX
from ldm.loading.random_weights import random_state_dict, save_checkpoint
from optimizedSD import optimized_img2img, optimized_txt2img
from optimizedSD.flags import compvis as compvis_flags
from optimizedSD.infotext import read_parameters
from tests import checkpoint_variants as variants

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


def _run(main, ckpt: Path, outdir: Path, *extra: str) -> list[Path]:
    argv = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--seed", "5", "--prompt", "a hill",
            "--sampler", "ddim", "--skip_grid", "--no-watermark", *extra]
    assert main(argv) == 0
    return sorted(p for p in outdir.rglob("seed_*") if p.is_file())


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def vae_setup(tiny_state_dict, tiny_config, tmp_path_factory):
    """A checkpoint without VAE, a VAE file, and the single file that carries both."""
    folder = tmp_path_factory.mktemp("vae_cli")
    other_vae = variants.vae_only(random_state_dict(tiny_config, seed=77))
    no_vae = save_checkpoint(variants.without(tiny_state_dict, VAE_PREFIX), folder / "no-vae.safetensors")
    vae = save_checkpoint({**other_vae, **variants.vae_training_loss()}, folder / "vae-ft-mse.safetensors")
    carrying = save_checkpoint(variants.with_vae(tiny_state_dict, other_vae), folder / "carrying.safetensors")
    return no_vae, vae, carrying


def _img2img(argv: list[str]) -> int:
    init = Path(argv[argv.index("--outdir") + 1]).with_name("init.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(init)
    return optimized_img2img.main([*argv, "--init-img", str(init)])


SCRIPTS = {
    "optimized_txt2img": optimized_txt2img.main,
    "optimized_img2img": _img2img,
    "compvis txt2img": lambda argv: compvis_flags.main(argv, "txt2img"),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_vae_flag_gives_the_carrying_files_image_and_metadata(script, vae_setup, tmp_path):
    no_vae, vae, carrying = vae_setup
    ours, *_ = _run(SCRIPTS[script], no_vae, tmp_path / "a", "--vae", str(vae), "--n_iter", "1")
    reference, *_ = _run(SCRIPTS[script], carrying, tmp_path / "b", "--n_iter", "1")
    assert np.array_equal(_pixels(ours), _pixels(reference))
    text = read_parameters(ours)
    shorthash = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {shorthash}, VAE: vae-ft-mse.safetensors" in text
    assert "VAE" not in read_parameters(reference)


def test_diffusers_folder_as_ckpt(tiny_state_dict, tiny_checkpoint, tmp_path):
    from tests.test_diffusers_layout import save_pipeline

    folder = save_pipeline(tiny_state_dict, TINY_CONFIG, tmp_path / "my-model")
    (ours,) = _run(optimized_txt2img.main, folder, tmp_path / "a")
    (reference,) = _run(optimized_txt2img.main, tiny_checkpoint, tmp_path / "b")
    assert np.array_equal(_pixels(ours), _pixels(reference))
    text = read_parameters(ours)
    assert "Model: my-model" in text and "Model hash" not in text


def test_embedding_cache_with_a_folder(tiny_state_dict, tmp_path):
    from tests.test_diffusers_layout import save_pipeline

    folder = save_pipeline(tiny_state_dict, TINY_CONFIG, tmp_path / "pipe")
    cache = tmp_path / "cache"
    (first,) = _run(optimized_txt2img.main, folder, tmp_path / "a", "--embedding_cache", str(cache))
    (second,) = _run(optimized_txt2img.main, folder, tmp_path / "b", "--embedding_cache", str(cache))
    assert any(cache.iterdir())
    assert np.array_equal(_pixels(first), _pixels(second))


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--vae", "nowhere/vae.safetensors"], "--vae not found: nowhere/vae.safetensors"),
        (["--vae", "{ckpt}"], "not a VAE"),
    ],
)
def test_vae_errors_are_one_line(tiny_checkpoint, tmp_path, capsys, extra, fragment):
    from tests.checkpoint_variants import kohya_lora

    lora = save_checkpoint(kohya_lora(), tmp_path / "lora.safetensors")
    extra = [e.replace("{ckpt}", str(lora)) for e in extra]
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", *extra]
    assert optimized_txt2img.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_folder_without_model_index_is_a_usage_error(tiny_checkpoint, tmp_path, capsys):
    argv = ["--ckpt", str(tmp_path), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(tmp_path / "out")]
    assert optimized_txt2img.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "neither a file nor a diffusers model folder" in line
