"""torchrun on the CPU (gloo, 2 processes): the same files and pixels as one process; a killed rank reports.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on the real script with
the tiny random checkpoint (64x64, DDIM).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from optimizedSD import optimized_txt2img
from optimizedSD.infotext import read_parameters

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds the rank's process through /proc")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "optimizedSD" / "optimized_txt2img.py"
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"
PROMPTS = ["a red cube", "a blue ball", "a green cone"]
TIMEOUT = 600


def _args(ckpt: Path, prompts: Path, outdir: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--sampler", "ddim", "--from-file", str(prompts), "--seed", "7", *extra]


def _torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _files(outdir: Path) -> dict[str, Path]:
    return {str(p.relative_to(outdir)): p for p in sorted(outdir.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_two_ranks_write_what_one_process_writes(tiny_checkpoint, prompts_file, tmp_path, capsys):
    flags = ["--n_iter", "2", "--n_samples", "2", "--ddim_steps", "2"]
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (torchrun's OMP_NUM_THREADS=1): other thread counts round otherwise
    try:
        assert optimized_txt2img.main(_args(tiny_checkpoint, prompts_file, single, *flags)) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    spread = tmp_path / "spread"
    run = _torchrun(_args(tiny_checkpoint, prompts_file, spread, *flags))
    out, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 0, err[-3000:]

    expected, got = _files(single), _files(spread)
    assert sorted(got) == sorted(expected) and len(got) == 3 * 2 * 2 + 1  # 12 images and the grid
    for name, path in expected.items():
        assert np.array_equal(_pixels(got[name]), _pixels(path)), name
        assert read_parameters(got[name]) == read_parameters(path), name
    summaries = [line for line in out.splitlines() if "images in" in line]
    assert len(summaries) == 1 and "12 images" in summaries[0] and "images/s over 2 ranks" in summaries[0], out
    assert out.count("Seed: 7") == 1  # rank 0 alone prints


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pid(agent: int, rank: int) -> int:
    for pid in _descendants(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID=" in b"\0".join(environ):
            return pid
    raise AssertionError(f"no process for rank {rank}")


def test_a_killed_rank_names_its_unfinished_units_and_the_other_finishes(tiny_checkpoint, prompts_file, tmp_path):
    """3 prompts x 4 iterations, one image each: 12 units, rank 1 has the odd ones. SIGTERM to rank 1 once its
    first image is written; rank 0 finishes its six, rank 1 names what it did not finish, in one line."""
    outdir = tmp_path / "out"
    run = _torchrun(_args(tiny_checkpoint, prompts_file, outdir, "--n_iter", "4", "--n_samples", "1",
                          "--ddim_steps", "8", "--skip_grid"))
    seed_of = re.compile(r"seed_(\d+)_\d+\.png$")

    def written_units() -> set[int]:
        return {int(seed_of.search(p.name).group(1)) - 7 for p in outdir.rglob("seed_*.png")}  # one image per unit

    deadline = time.monotonic() + TIMEOUT
    while not any(unit % 2 == 1 for unit in written_units()):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(_rank_pid(run.pid, 1), signal.SIGTERM)
    out, err = run.communicate(timeout=TIMEOUT)

    assert run.returncode != 0
    lines = [line for line in err.splitlines() if "unfinished units" in line]
    assert len(lines) == 1, err[-3000:]
    assert "rank 1 of 2 stopped (SIGTERM)" in lines[0]
    named = {int(n) for n in re.findall(r"#(\d+) \(", lines[0])}
    done = written_units()
    assert {u for u in range(0, 12, 2)} <= done  # rank 0 finished its share
    assert named and named == {u for u in range(1, 12, 2)} - done  # exactly rank 1's units without an image
    for path in outdir.rglob("seed_*.png"):  # nothing half-written
        assert _pixels(path).shape == (64, 64, 3)
    summaries = [line for line in out.splitlines() if "images in" in line]
    assert len(summaries) == 1 and f"{len(done)} images" in summaries[0]
