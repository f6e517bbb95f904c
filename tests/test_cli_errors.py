"""Bad input: one line on stderr naming the problem, exit code 2, no traceback; written images stay."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ldm.pipeline import decode as decode_stage
from optimizedSD import optimized_img2img, optimized_txt2img, run_outputs

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


@pytest.fixture
def base(tiny_checkpoint, tmp_path):
    return ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1",
            "--sampler", "ddim", "--seed", "1"]


@pytest.fixture
def init_image(tmp_path):
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (120, 60, 30)).save(path)
    return path


def expect_usage_error(capsys, main, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_checkpoint(base, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.ckpt"
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--ckpt", str(missing)],
                       "checkpoint not found", str(missing), "models/README.md")


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04 broken zip"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupt_checkpoint(base, tmp_path, capsys, content, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(content)
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--ckpt", str(bad)], str(bad), "models/README.md")


def test_checkpoint_of_another_model(base, tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3, 3)}, str(other))
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--ckpt", str(other)], str(other))


@pytest.mark.parametrize("flag, value", [("--H", "65"), ("--W", "0"), ("--H", "-64"), ("--W", "100")])
def test_size_not_a_positive_multiple_of_64(base, capsys, flag, value):
    expect_usage_error(capsys, optimized_txt2img.main, [*base, flag, value], flag, "multiple of 64")


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_strength_outside_0_1(base, init_image, capsys, value):
    expect_usage_error(capsys, optimized_img2img.main, [*base, "--init-img", str(init_image), "--strength", value],
                       "--strength", "between 0 and 1")


def test_missing_init_image(base, tmp_path, capsys):
    expect_usage_error(capsys, optimized_img2img.main, [*base, "--init-img", str(tmp_path / "none.png")],
                       "init image not found")
    expect_usage_error(capsys, optimized_img2img.main, base, "--init-img is required")


def test_unreadable_init_image(base, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    expect_usage_error(capsys, optimized_img2img.main, [*base, "--init-img", str(bad)], "cannot read init image")


def test_tiny_init_image_without_size(base, tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 200)).save(small)
    argv = [a for a in base if a not in ("--H", "--W", "64")]
    expect_usage_error(capsys, optimized_img2img.main, [*argv, "--init-img", str(small)], "at least 64 px")


def test_prompts_file_missing_or_empty(base, tmp_path, capsys):
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--from-file", str(tmp_path / "none.txt")],
                       "prompts file not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--from-file", str(empty)], "no prompts")


def test_unwritable_outdir(base, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--outdir", str(blocker / "out")],
                       "cannot create output folder")


def test_unknown_sampler(base, capsys):
    expect_usage_error(capsys, optimized_txt2img.main, [*base, "--sampler", "magic"], "unknown --sampler 'magic'")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--ddim_steps", "0"], "--ddim_steps must be at least 1"),
        (["--ddim_steps", "1001"], "--ddim_steps must be at most 1000"),
        (["--n_samples", "0"], "--n_samples must be at least 1"),
        (["--n_iter", "0"], "--n_iter must be at least 1"),
        (["--sampler", "euler", "--ddim_eta", "0.5"], "--ddim_eta applies only to --sampler ddim"),
        (["--prompt", "a:1 b:-1"], "sum to 0"),
        (["--ddim_steps", "two"], "invalid int value"),
        (["--precision", "half"], "invalid choice"),
        (["--device", "tpu"], "--device"),
        (["--config", "missing.yaml"], "config file not found"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--seed", "-1"], "--seed must be between 0"),
        (["--unet_bs", "0"], "--unet_bs must be at least 1"),
        (["--vram", "tiny"], "invalid choice"),
        (["--vram_budget", "0"], "--vram_budget must be a positive"),
        (["--vram_budget", "inf"], "--vram_budget must be a positive"),
        (["--vram", "low", "--vram_budget", "0.000001"], "budget"),
        (["--vram", "medium", "--vram_budget", "1"], "--vram_budget applies to --vram low, not medium"),
        (["--turbo", "--vram_budget", "1"], "not medium (--turbo)"),
        (["--ddim_eta", "1.5"], "--ddim_eta must be between 0 and 1"),
        (["--scale", "nan"], "--scale must be a finite number"),
        (["--scale", "inf"], "--scale must be a finite number"),
        (["--H", "640000"], "--H must be at most 8192"),
        (["--n_rows", "-2"], "--n_rows must be 0"),
    ],
)
def test_other_bad_values(base, capsys, flags, fragment):
    expect_usage_error(capsys, optimized_txt2img.main, [*base, *flags], fragment)


def test_images_written_before_a_failure_stay(base, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = run_outputs.to_uint8

    def failing_after_first(images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure while decoding the second image")
        return original(images)

    monkeypatch.setattr(run_outputs, "to_uint8", failing_after_first)
    with pytest.raises(RuntimeError, match="simulated failure"):
        optimized_txt2img.main([*base, "--n_samples", "3"])
    written = sorted(p.name for p in (tmp_path / "out").rglob("seed_*"))
    assert written == ["seed_1_00000.png"]


def test_a_failed_write_is_one_line(base, tmp_path, capsys, monkeypatch):
    from optimizedSD import outputs

    class FullDisk:
        def save(self, handle, **kwargs):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.Image, "fromarray", lambda array: FullDisk())
    assert optimized_txt2img.main([*base, "--skip_grid"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]  # the rest is tqdm's progress
    assert "cannot write" in line and "No space left on device" in line
    assert not list((tmp_path / "out").rglob("seed_*"))  # no half-written file left behind


def test_out_of_memory_is_one_line(base, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(decode_stage, "decode_image", exhausted)
    assert optimized_txt2img.main(base) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "out of memory" in line and "--vram low" in line
