"""End to end: optimizedSD/optimized_txt2img.py on a tiny random checkpoint (64x64 images, 2 steps).

The script runs in-process through its ``main(argv)``; one test runs it as a real subprocess.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from optimizedSD import optimized_txt2img
from optimizedSD.arguments import SAMPLERS
from optimizedSD.infotext import read_parameters

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


def run(ckpt: Path, outdir: Path, *extra: str, capsys=None) -> int:
    argv = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--seed", "7",
            "--prompt", "a tiny test", "--sampler", "ddim", *extra]
    return optimized_txt2img.main(argv)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def samples(outdir: Path) -> list[Path]:
    return sorted(p for p in outdir.rglob("seed_*") if p.is_file())


def ckpt_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_writes_named_images_with_metadata_and_a_grid(tiny_checkpoint, tmp_path, sampler, capsys):
    assert run(tiny_checkpoint, tmp_path, "--sampler", sampler, "--n_samples", "2", "--seed", "41",
               "--negative_prompt", "blurry, dark") == 0
    folder = tmp_path / "a_tiny_test"
    assert sorted(p.name for p in folder.iterdir()) == ["seed_41_00000.png", "seed_42_00001.png"]
    labels = {"ddim": "DDIM", "plms": "PLMS", "unipc": "UniPC", "dpmpp_2m": "DPM++ 2M", "euler": "Euler",
              "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "lms": "LMS", "dpmpp_2s_a": "DPM++ 2S a",
              "dpm_fast": "DPM fast", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
              "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE",
              "dpm_adaptive": "DPM adaptive", "restart": "Restart", "lcm": "LCM"}
    karras = sampler in ("dpmpp_2m", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "restart")  # their webui default (Automatic)
    exponential = sampler in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
    label = "Karras" if karras else "Exponential" if exponential else "Uniform"
    schedule = "" if sampler in ("ddim", "plms", "unipc", "lcm") else f"Schedule type: {label}, "
    assert read_parameters(folder / "seed_42_00001.png") == (
        "a tiny test\nNegative prompt: blurry, dark\n"
        f"Steps: 2, Sampler: {labels[sampler]}, {schedule}CFG scale: 7.5, Seed: 42, Size: 64x64, "
        f"Model hash: {ckpt_hash(tiny_checkpoint)}, Model: {tiny_checkpoint.stem}, RNG: CPU, Version: optimizedSD 0.1.0"
    )
    image = pixels(folder / "seed_41_00000.png")
    assert image.shape == (64, 64, 3) and image.std() > 0  # not a blank image
    with Image.open(tmp_path / "grid-0000.png") as grid:  # 2 per row (n_rows = n_samples), 2 px padding
        assert grid.size == (2 * 66 + 2, 66 + 2)
    out = capsys.readouterr().out
    assert "Seed: 41" in out
    assert re.search(r"2 images in [\d.]+ s \([\d.]+ s/image\)", out)


def test_second_run_does_not_overwrite(tiny_checkpoint, tmp_path):
    assert run(tiny_checkpoint, tmp_path, "--n_samples", "2") == 0
    first = {p: p.read_bytes() for p in samples(tmp_path)}
    assert run(tiny_checkpoint, tmp_path, "--n_samples", "2") == 0
    names = [p.name for p in samples(tmp_path)]
    assert names == ["seed_7_00000.png", "seed_7_00002.png", "seed_8_00001.png", "seed_8_00003.png"]
    assert all(p.read_bytes() == data for p, data in first.items())
    assert sorted(p.name for p in tmp_path.glob("grid-*")) == ["grid-0000.png", "grid-0001.png"]
    # same seeds, same settings: the second run's images equal the first's
    assert (tmp_path / "a_tiny_test" / "seed_7_00002.png").read_bytes() == first[tmp_path / "a_tiny_test" / "seed_7_00000.png"]


def test_same_seed_gives_byte_identical_files(tiny_checkpoint, tmp_path):
    for name in ("a", "b"):
        assert run(tiny_checkpoint, tmp_path / name, "--sampler", "euler_a", "--n_samples", "2", "--seed", "123") == 0
    a, b = samples(tmp_path / "a"), samples(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert (tmp_path / "a" / "grid-0000.png").read_bytes() == (tmp_path / "b" / "grid-0000.png").read_bytes()


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_image_k_of_a_batch_is_a_single_run_with_seed_plus_k(tiny_checkpoint, tmp_path, sampler):
    assert run(tiny_checkpoint, tmp_path / "batch", "--sampler", sampler, "--n_samples", "3", "--n_iter", "2",
               "--seed", "100", "--skip_grid") == 0
    batch = samples(tmp_path / "batch")
    seeds = sorted(int(p.name.split("_")[1]) for p in batch)
    assert seeds == [100, 101, 102, 103, 104, 105]  # counting across the batch and the iterations
    for k in (1, 4):
        assert run(tiny_checkpoint, tmp_path / f"single{k}", "--sampler", sampler, "--seed", str(100 + k)) == 0
        (alone,) = samples(tmp_path / f"single{k}")
        (in_batch,) = [p for p in batch if p.name.startswith(f"seed_{100 + k}_")]
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1


def test_fixed_code_reuses_the_first_batch_noise(tiny_checkpoint, tmp_path):
    # CompVis / the fork: one start code of n_samples latents, reused by every iteration.
    assert run(tiny_checkpoint, tmp_path, "--fixed_code", "--n_samples", "2", "--n_iter", "2", "--seed", "9") == 0
    files = sorted(samples(tmp_path), key=lambda p: p.name[-9:])  # in the order written
    assert [p.name for p in files] == ["seed_9_00000.png", "seed_10_00001.png", "seed_9_00002.png", "seed_10_00003.png"]
    first, second, third, fourth = (pixels(p) for p in files)
    assert np.abs(first - third).max() <= 1 and np.abs(second - fourth).max() <= 1
    assert np.abs(first - second).mean() > 5  # images within a batch differ


def test_prompts_file_gives_one_folder_per_prompt(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\nfirst prompt\n\nsecond: prompt:2\nthird/prompt?\n", encoding="utf-8")
    assert run(tiny_checkpoint, tmp_path / "out", "--from-file", str(prompts), "--n_samples", "2") == 0
    folders = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert folders == ["first_prompt", "second__prompt_2", "third_prompt_"]
    files = samples(tmp_path / "out")
    assert len(files) == 6
    seeds = sorted(int(p.name.split("_")[1]) for p in files)
    assert seeds == list(range(7, 13))
    assert read_parameters(tmp_path / "out" / "third_prompt_" / "seed_11_00000.png").startswith("third/prompt?\n")
    with Image.open(tmp_path / "out" / "grid-0000.png") as grid:  # 6 images, 2 per row
        assert grid.size == (2 * 66 + 2, 3 * 66 + 2)


def test_text_encoder_runs_once_per_distinct_prompt(tiny_checkpoint, tmp_path, monkeypatch):
    from ldm.conditioning.text_encoder import CLIPTextEncoder

    seen: list[str] = []
    encoded: list[int] = []
    original, original_encode = CLIPTextEncoder.chunk_prompt, CLIPTextEncoder.encode_chunks

    def counting(self, fragments, find_embedding=None):  # every text is chunked once, then encoded
        seen.append("".join(fragment.text for fragment in fragments))
        return original(self, fragments, find_embedding)

    def counting_encode(self, chunks, clip_skip=1):
        encoded.append(len(chunks))
        return original_encode(self, chunks, clip_skip)

    monkeypatch.setattr(CLIPTextEncoder, "chunk_prompt", counting)
    monkeypatch.setattr(CLIPTextEncoder, "encode_chunks", counting_encode)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat:1 a dog:3\na cat\na cat:1 a dog:3\n", encoding="utf-8")
    cache = tmp_path / "cache"
    assert run(tiny_checkpoint, tmp_path / "out1", "--from-file", str(prompts), "--n_iter", "2",
               "--embedding_cache", str(cache)) == 0
    assert sorted(seen) == ["", "a cat", "a dog"] and sum(encoded) == 3
    assert len(samples(tmp_path / "out1")) == 6

    seen.clear()  # a second run finds every encoding on disk and gives the same images
    encoded.clear()
    assert run(tiny_checkpoint, tmp_path / "out2", "--from-file", str(prompts), "--n_iter", "2",
               "--embedding_cache", str(cache)) == 0
    assert encoded == []
    assert sorted(seen) == ["", "a cat", "a dog"]  # only chunked: the shape each cached entry must have
    assert [p.read_bytes() for p in samples(tmp_path / "out1")] == [p.read_bytes() for p in samples(tmp_path / "out2")]


def test_the_embedding_cache_tells_apart_checkpoints_whose_text_encoders_differ_mid_file(tmp_path):
    """Cached encodings are keyed by the text encoder's tensors, not by the file's first and last MB: a checkpoint
    whose text encoder differs only past them (as a merged LoRA's does) gets encodings of its own."""
    import torch

    from ldm.checkpoints.hashes import checkpoint_fingerprint
    from ldm.config import load_model_config
    from ldm.loading.random_weights import random_state_dict, save_checkpoint
    from tests.conftest import TINY_CONFIG

    state = random_state_dict(load_model_config(TINY_CONFIG), seed=31)
    generator = torch.Generator().manual_seed(2)
    layer = "cond_stage_model.transformer.text_model.encoder.layers.1."
    other = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if k.startswith(layer) else v for k, v in state.items()}
    first, second = save_checkpoint(state, tmp_path / "a.safetensors"), save_checkpoint(other, tmp_path / "b.safetensors")
    assert checkpoint_fingerprint(first) == checkpoint_fingerprint(second)
    cache = ("--embedding_cache", str(tmp_path / "cache"), "--prompt", "a red cube", "--scale", "20", "--skip_grid")
    assert run(first, tmp_path / "a", *cache) == 0 and run(second, tmp_path / "b", *cache) == 0
    assert run(second, tmp_path / "b_plain", *cache[2:]) == 0
    (a,), (b,), (b_plain,) = (samples(tmp_path / name) for name in ("a", "b", "b_plain"))
    assert np.array_equal(pixels(b), pixels(b_plain))  # the second checkpoint's own encodings
    assert np.abs(pixels(a) - pixels(b_plain)).max() > 1  # the text encoders do give other images


def test_weights_and_negative_prompt_change_the_image(tiny_checkpoint, tmp_path):
    variants = {
        "plain": ["--prompt", "a red cube"],
        "weighted": ["--prompt", "a red cube:0.2 a blue sphere:0.8"],
        "negative": ["--prompt", "a red cube", "--negative_prompt", "a blue sphere"],
    }
    images = {}
    for name, flags in variants.items():
        assert run(tiny_checkpoint, tmp_path / name, *flags, "--scale", "20") == 0
        (path,) = samples(tmp_path / name)
        images[name] = pixels(path)
    assert np.abs(images["plain"] - images["weighted"]).max() > 1
    assert np.abs(images["plain"] - images["negative"]).max() > 1


def test_formats_and_skips(tiny_checkpoint, tmp_path):
    assert run(tiny_checkpoint, tmp_path / "jpg", "--format", "jpg", "--skip_grid") == 0
    (path,) = samples(tmp_path / "jpg")
    assert path.name == "seed_7_00000.jpg" and read_parameters(path).startswith("a tiny test\nSteps: 2")
    assert not list((tmp_path / "jpg").glob("grid-*"))
    assert run(tiny_checkpoint, tmp_path / "nosave", "--skip_save", "--n_samples", "2", "--n_rows", "1") == 0
    assert samples(tmp_path / "nosave") == []
    with Image.open(tmp_path / "nosave" / "grid-0000.png") as grid:  # one image per row
        assert grid.size == (66 + 2, 2 * 66 + 2)


def test_memory_modes_give_the_same_image(tiny_checkpoint, tmp_path):
    for mode in ("full", "medium", "low"):
        assert run(tiny_checkpoint, tmp_path / mode, "--vram", mode, "--attention",
                   "sliced" if mode == "low" else "sdpa", "--unet_bs", "1" if mode == "low" else "2") == 0
    reference = pixels(samples(tmp_path / "full")[0])
    for mode in ("medium", "low"):
        assert np.abs(pixels(samples(tmp_path / mode)[0]) - reference).max() <= 1
    assert run(tiny_checkpoint, tmp_path / "turbo", "--turbo") == 0
    assert np.abs(pixels(samples(tmp_path / "turbo")[0]) - reference).max() <= 1
    # a 64 px image is one VAE tile: tiled decoding gives the same image
    assert run(tiny_checkpoint, tmp_path / "tiled", "--vae_tiling") == 0
    assert np.abs(pixels(samples(tmp_path / "tiled")[0]) - reference).max() <= 1


def test_compvis_wrapper_translates_flags(tiny_checkpoint, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import txt2img as compvis_txt2img
    finally:
        sys.path.remove(str(REPO / "scripts"))
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--prompt", "a tiny test"]
    assert compvis_txt2img.main([*argv, "--outdir", str(tmp_path / "plms"), "--plms"]) == 0
    assert compvis_txt2img.main([*argv, "--outdir", str(tmp_path / "ddim")]) == 0
    (plms,), (ddim,) = samples(tmp_path / "plms"), samples(tmp_path / "ddim")
    assert plms.name == "seed_42_00000.png"  # CompVis' default seed
    assert "Sampler: PLMS" in read_parameters(plms) and "Sampler: DDIM" in read_parameters(ddim)
    assert compvis_txt2img.main([*argv, "--outdir", str(tmp_path / "x"), "--laion400m"]) == 2
    without_n_iter = argv[:-4] + argv[-2:]
    assert "--n_iter" not in without_n_iter
    assert compvis_txt2img.main([*without_n_iter, "--outdir", str(tmp_path / "default_iter")]) == 0
    assert len(samples(tmp_path / "default_iter")) == 2  # CompVis' txt2img runs 2 iterations by default


def test_script_runs_as_a_subprocess(tiny_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "optimizedSD" / "optimized_txt2img.py"), "--ckpt", str(tiny_checkpoint),
         "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(tmp_path), "--H", "64", "--W", "64",
         "--ddim_steps", "2", "--n_samples", "1", "--prompt", "from a subprocess"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    seed = int(re.search(r"Seed: (\d+)", result.stdout).group(1))  # random, and printed
    assert [p.name for p in samples(tmp_path)] == [f"seed_{seed}_00000.png"]
    assert "1 images in" in result.stdout


def test_vae_tiling_on_a_wide_image(tiny_checkpoint, tmp_path):
    """576 px wide is 72 latents: two overlapping 64-latent tiles, blended into one image of the right size."""
    for name, flags in (("tiled", ["--vae_tiling"]), ("whole", [])):
        assert run(tiny_checkpoint, tmp_path / name, "--W", "576", "--skip_grid", *flags) == 0
    tiled, whole = pixels(samples(tmp_path / "tiled")[0]), pixels(samples(tmp_path / "whole")[0])
    assert tiled.shape == whole.shape == (64, 576, 3)
    # tiles normalise their own GroupNorm statistics: close to the whole decode (~1.5 levels on average
    # with random weights), but not equal, which shows the tiled path ran
    difference = np.abs(tiled - whole).mean()
    assert 0 < difference < 4
