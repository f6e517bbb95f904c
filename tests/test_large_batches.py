"""Large batches run in parts bounded by the memory the run may use, with the same images.

The split run is forced in-process by lowering what ``host_available_bytes`` reports (the seam the CPU run
reads); the command-line runs set a real ``RLIMIT_DATA``, which the run reads as its host memory limit
and which the kernel enforces: a run that did not bound its memory would fail inside it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import load_model_config
from ldm.ledger import batch_parts as batch_memory
from optimizedSD import optimized_txt2img

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"
SCRIPT = REPO / "optimizedSD" / "optimized_txt2img.py"
DATA_LIMIT = 3 * 2**30  # RLIMIT_DATA of the command-line runs: Python, torch and the tiny model take ~1 GiB of it


def _run(ckpt: Path, outdir: Path, *extra: str) -> int:
    return optimized_txt2img.main([
        "--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
        "--H", "64", "--W", "64", "--ddim_steps", "2", "--seed", "11", "--prompt", "a tiny test", *extra])


def _images(outdir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(outdir)): np.asarray(Image.open(p)) for p in sorted(outdir.rglob("*.png"))}


@pytest.mark.parametrize("sampler, unet_bs", [("euler_a", "1"), pytest.param("dpm_solver", None, marks=pytest.mark.slow)])
def test_a_batch_in_parts_gives_the_same_files_pixels_and_grid(tiny_checkpoint, tmp_path, monkeypatch, caplog, sampler,
                                                               unet_bs):
    """Ancestral (fresh noise each step) and multistep samplers: 3 images in parts of 2 and 1 = one batch of 3.

    With ``--unet_bs 1`` every UNet call is one row in both runs: equal pixel for pixel. Without it the UNet
    sees 6 rows in one run and 4 or 2 in the other, and the CPU's kernels round a batch of 2 rows differently
    (the tolerance of tests/test_cli_txt2img.py's batch-versus-alone test: one level)."""
    args = ("--n_samples", "3", "--n_iter", "2", "--sampler", sampler, *(("--unet_bs", unet_bs) if unet_bs else ()))
    assert _run(tiny_checkpoint, tmp_path / "whole", *args) == 0
    assert "parts" not in caplog.text
    part = batch_memory.ledger_bytes(load_model_config(TINY_CONFIG), "full", 64, 64, torch.float32, sampler, "sdpa",
                                     int(unet_bs) if unet_bs else None, torch.device("cpu"), False)
    assert part.per_image > 0
    grid = batch_memory.grid_host_bytes(6, 64, 64)  # the run keeps its 6 images for the grid
    available = part.need(2) + part.per_image // 2 + grid  # room for 2 images, not 3
    monkeypatch.setattr(batch_memory, "host_available_bytes", lambda: available)
    assert _run(tiny_checkpoint, tmp_path / "parts", *args) == 0
    assert "3 images per batch" in caplog.text and "in 2 parts" in caplog.text
    whole, parts = _images(tmp_path / "whole"), _images(tmp_path / "parts")
    assert len(whole) == 7 and "grid-0000.png" in whole  # 6 images and the grid
    assert list(whole) == list(parts)
    differing = 0
    for name in whole:
        difference = np.abs(whole[name].astype(np.int16) - parts[name])
        assert difference.max() <= (0 if unet_bs else 1), name
        differing += int(np.count_nonzero(difference))
    print(f"{sampler} --unet_bs {unet_bs}: {differing} of {sum(a.size for a in whole.values())} values differ by one level")


def test_no_grid_over_the_cap_but_every_image(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(batch_memory, "MAX_GRID_PIXELS", 3 * 64 * 64)
    assert _run(tiny_checkpoint, tmp_path, "--n_samples", "4") == 0
    assert not list(tmp_path.glob("grid-*")) and len(list(tmp_path.rglob("seed_*.png"))) == 4
    assert "no grid: 4 images of 64x64" in caplog.text


def _limit_data() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))


def _cli(tmp_path: Path, ckpt: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(SCRIPT), "--prompt", "a photo", "--ckpt", str(ckpt), "--config", str(TINY_CONFIG),
            "--device", "cpu", "--outdir", str(tmp_path / "out"), "--ddim_steps", "1", "--seed", "3", *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=tmp_path, preexec_fn=_limit_data)


def _finish(process: subprocess.Popen) -> tuple[int, str, int]:
    stderr = process.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), stderr, usage.ru_maxrss * 1024


def test_cli_refuses_an_image_that_cannot_fit_in_one_line_before_sampling(tiny_checkpoint, tmp_path):
    started = time.monotonic()
    process = _cli(tmp_path, tiny_checkpoint, "--n_samples", "10000", "--H", "8192", "--W", "8192", "--skip_grid")
    code, stderr, peak = _finish(process)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "one 8192x8192 image needs about" in lines[0] and "GiB of host memory" in lines[0], lines[0]
    assert "fits" in lines[0] and not list(tmp_path.rglob("*.png"))
    assert peak < DATA_LIMIT and time.monotonic() - started < 120


@pytest.mark.slow
def test_cli_runs_ten_thousand_images_in_bounded_parts(tiny_checkpoint, tmp_path):
    """``--n_samples 10000`` under a 3 GiB data limit: one warning line for the parts, one for the grid, the
    first images written under their names, the memory bounded; stopped with SIGINT once images appear."""
    process = _cli(tmp_path, tiny_checkpoint, "--n_samples", "10000", "--H", "256", "--W", "256")
    folder = tmp_path / "out" / "a_photo"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None and len(list(folder.glob("seed_*.png"))) < 3:
        time.sleep(0.5)
    process.send_signal(2)
    code, stderr, peak = _finish(process)
    written = sorted(p.name for p in folder.glob("seed_*.png"))
    assert written[:3] == ["seed_3_00000.png", "seed_4_00001.png", "seed_5_00002.png"], (written[:5], stderr[-2000:])
    assert "10000 images per batch" in stderr and "parts" in stderr and "no grid: 10000 images" in stderr, stderr[-2000:]
    assert peak < DATA_LIMIT, peak
    parts = next(line for line in stderr.splitlines() if "parts" in line)
    print(f"peak RSS {peak / 2**20:.0f} MiB, {len(written)} images written, exit {code}; {parts}")
