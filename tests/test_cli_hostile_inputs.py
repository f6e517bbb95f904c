"""Hostile inputs through the scripts: one line and exit 2 for bad input, the run goes on where it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optimizedSD import optimized_txt2img

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


@pytest.fixture
def base(tiny_checkpoint, tmp_path):
    return ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1",
            "--sampler", "ddim", "--seed", "1", "--skip_grid"]


def _one_line_error(capsys, argv, fragment: str) -> str:
    assert optimized_txt2img.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--prompt", b"a \xff cat".decode("utf-8", "surrogateescape")], "--prompt is not valid UTF-8"),
        (["--negative_prompt", b"\xc3(".decode("utf-8", "surrogateescape")], "--negative_prompt is not valid UTF-8"),
        (["--prompt", "a:1e300 b:-1e300 c:1"], "out of range"),
        (["--scale", "1e308"], "--scale must be a finite number"),
        (["--from-file", "/dev/zero"], "not a regular file"),
        (["--outdir"], "--outdir needs a value"),
        (["--prompt"], "--prompt needs a value"),
    ],
    ids=["prompt_utf8", "negative_utf8", "weights_overflow", "scale_1e308", "prompts_dev_zero", "outdir_bare", "prompt_bare"],
)
def test_bad_input_is_one_line(base, capsys, extra, fragment):
    _one_line_error(capsys, [*base, *extra], fragment)


def test_a_cjk_prompt_gets_a_folder_under_200_bytes(base, tmp_path, capsys):
    prompt = "猫が窓辺で眠る" * 15  # 105 characters, 315 bytes
    assert optimized_txt2img.main([*base, "--prompt", prompt]) == 0
    folders = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(folders[0].name.encode("utf-8")) <= 200
    assert prompt.startswith(folders[0].name) and len(list(folders[0].glob("*.png"))) == 1


def test_an_unusable_embedding_cache_is_a_warning_not_a_failure(base, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert optimized_txt2img.main([*base, "--embedding_cache", str(blocker / "cache")]) == 0
    assert "not using --embedding_cache" in caplog.text
    assert len(list((tmp_path / "out").rglob("*.png"))) == 1


@pytest.mark.parametrize("stdout", ["closed_pipe", "dev_full"])
def test_a_closed_or_full_stdout_does_not_fail_the_run(base, tmp_path, stdout):
    command = [sys.executable, str(REPO / "optimizedSD" / "optimized_txt2img.py"), *base]
    if stdout == "dev_full":
        with open("/dev/full", "w") as full:
            run = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, cwd=tmp_path)
        code, err = run.returncode, run.stderr
    else:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        process.stdout.close()  # as `| true` does
        err = process.stderr.read()
        code = process.wait(timeout=300)
    assert code == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    assert len(list((tmp_path / "out").rglob("*.png"))) == 1


def test_a_damaged_cache_entry_is_recomputed_and_replaced(base, tmp_path, caplog):
    """A cached encoding with NaN, or of the wrong dtype or rank: one warning, the same image as without a cache."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    assert optimized_txt2img.main([*base, "--embedding_cache", str(cache), "--outdir", str(tmp_path / "first")]) == 0
    entries = sorted(cache.glob("*.safetensors"))
    assert entries
    first = np.asarray(Image.open(next((tmp_path / "first").rglob("*.png"))))
    for index, entry in enumerate(entries):
        bad = [torch.full((77, 32), float("nan")), torch.zeros(3, dtype=torch.float64)][index % 2]
        save_file({"encoding": bad}, str(entry))
    assert optimized_txt2img.main([*base, "--embedding_cache", str(cache), "--outdir", str(tmp_path / "second")]) == 0
    assert "entries unusable, computed again" in caplog.text
    second = np.asarray(Image.open(next((tmp_path / "second").rglob("*.png"))))
    assert np.array_equal(first, second)
    assert all(torch.isfinite(load_file(str(entry))["encoding"]).all() for entry in entries)  # replaced
