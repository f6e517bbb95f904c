"""Host memory under a cgroup limit: the reader on fake ``/proc`` and cgroup trees (v1, v2 nested, unlimited,
files missing), and, where this machine lets a test create a memory cgroup, the command line under a real
2.5 GiB limit: one line for an image that cannot fit, parts for a batch that cannot, never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.host_memory import CGROUP_ROOT, cgroup_available_bytes, host_available_bytes

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"
SCRIPT = REPO / "optimizedSD" / "optimized_txt2img.py"
GiB = 2**30
V1_NO_LIMIT = "9223372036854771712"
LIMIT = 5 * GiB // 2


def _tree(tmp_path: Path, membership: str, files: dict[str, str], available_kib: int = 16 * 2**20) -> tuple[Path, Path]:
    """A fake /proc (``self/cgroup``, ``meminfo``) and cgroup root holding ``files`` (relative path: content)."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(membership)
    (proc / "meminfo").write_text(f"MemTotal:       {2 * available_kib} kB\nMemAvailable:   {available_kib} kB\n")
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content + "\n")
    return proc, root


def test_v1_memory_controller_at_the_process_path(tmp_path):
    proc, root = _tree(tmp_path, "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n", {
        "memory/memory.limit_in_bytes": V1_NO_LIMIT, "memory/memory.usage_in_bytes": str(40 * GiB),
        "memory/docker/memory.limit_in_bytes": V1_NO_LIMIT,
        "memory/docker/abc/memory.limit_in_bytes": str(LIMIT), "memory/docker/abc/memory.usage_in_bytes": str(GiB),
    })
    assert cgroup_available_bytes(proc / "self" / "cgroup", root) == LIMIT - GiB
    assert host_available_bytes(proc, root) == LIMIT - GiB  # under MemAvailable's 16 GiB


def test_v1_combined_controllers_and_a_container_mounted_as_the_root(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, the mount is the container's."""
    proc, root = _tree(tmp_path, "7:cpu,memory:/docker/abc\n", {
        "memory/memory.limit_in_bytes": str(3 * GiB), "memory/memory.usage_in_bytes": str(GiB // 2),
    })
    assert cgroup_available_bytes(proc / "self" / "cgroup", root) == 3 * GiB - GiB // 2


def test_v2_nested_the_tightest_limit_up_the_tree_wins(tmp_path):
    proc, root = _tree(tmp_path, "0::/system.slice/app.service\n", {
        "system.slice/app.service/memory.max": str(4 * GiB), "system.slice/app.service/memory.current": str(GiB // 2),
        "system.slice/memory.max": str(3 * GiB), "system.slice/memory.current": str(2 * GiB),  # 1 GiB left
        "memory.current": str(50 * GiB),  # the root has no memory.max
    })
    assert cgroup_available_bytes(proc / "self" / "cgroup", root) == GiB
    assert host_available_bytes(proc, root) == GiB


def test_v2_own_limit_tighter_than_its_parents(tmp_path):
    proc, root = _tree(tmp_path, "0::/user.slice/session/app\n", {
        "user.slice/session/app/memory.max": str(2 * GiB), "user.slice/session/app/memory.current": str(GiB // 4),
        "user.slice/session/memory.max": "max", "user.slice/session/memory.current": str(9 * GiB),
        "user.slice/memory.max": str(12 * GiB), "user.slice/memory.current": str(9 * GiB),
    })
    assert cgroup_available_bytes(proc / "self" / "cgroup", root) == 2 * GiB - GiB // 4


def test_unlimited_max_leaves_mem_available(tmp_path):
    proc, root = _tree(tmp_path, "0::/a/b\n4:memory:/a/b\n", {
        "a/b/memory.max": "max", "a/b/memory.current": str(GiB), "a/memory.max": "max",
        "memory/a/b/memory.limit_in_bytes": V1_NO_LIMIT, "memory/a/b/memory.usage_in_bytes": str(GiB),
    }, available_kib=6 * 2**20)
    assert cgroup_available_bytes(proc / "self" / "cgroup", root) is None
    assert host_available_bytes(proc, root) == 6 * GiB


def test_missing_or_odd_files_are_no_limit(tmp_path):
    proc, root = _tree(tmp_path, "garbage\n3:memory\n0::/gone/away\n4:memory:/../escape\n", {
        "escape/memory.limit_in_bytes": "1",
    }, available_kib=6 * 2**20)
    assert cgroup_available_bytes(proc / "self" / "cgroup", root) is None
    assert cgroup_available_bytes(tmp_path / "no" / "cgroup", root) is None
    assert host_available_bytes(proc, root) == 6 * GiB
    assert host_available_bytes(tmp_path / "no_proc", tmp_path / "no_cgroup") is not None  # sysconf's answer
    limit_only = _tree(tmp_path / "limit_only", "0::/x\n", {"x/memory.max": str(GiB)})
    assert cgroup_available_bytes(limit_only[0] / "self" / "cgroup", limit_only[1]) == GiB  # no memory.current


# ---- a real cgroup, where the machine allows one ----------------------------------------------------------------
@pytest.fixture
def memory_cgroup():
    """A child of this process's own memory cgroup limited to 2.5 GiB: (its folder, its usage peak file)."""
    made = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            parent, limit_file, peak_file = CGROUP_ROOT / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.max_usage_in_bytes"
        elif number == "0" and controllers == "":
            parent, limit_file, peak_file = CGROUP_ROOT / path.lstrip("/"), "memory.max", "memory.peak"
        else:
            continue
        child = parent / f"optimizedsd-test-{os.getpid()}"
        try:
            child.mkdir()
            (child / limit_file).write_text(str(LIMIT))
            made = (child, child / peak_file)
            break
        except OSError:
            if child.is_dir():
                child.rmdir()
    if made is None:
        pytest.skip("this machine does not let the test create a memory cgroup")
    yield made
    for _ in range(50):  # the run's tasks leave the cgroup as they end
        try:
            made[0].rmdir()
            break
        except OSError:
            time.sleep(0.1)


def _cli_in(cgroup: Path, ckpt: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """The script in ``cgroup`` (moved there before it starts), without any rlimit: only the cgroup bounds it."""
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    argv = [sys.executable, str(SCRIPT), "--prompt", "a photo", "--ckpt", str(ckpt), "--config", str(TINY_CONFIG),
            "--device", "cpu", "--outdir", str(tmp_path / "out"), "--ddim_steps", "1", "--seed", "3", *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=tmp_path, preexec_fn=enter)


def _finish(process: subprocess.Popen, peak_file: Path) -> tuple[int, str, int]:
    stderr = process.stderr.read().decode("utf-8", "replace")
    return process.wait(), stderr, int(peak_file.read_text())


def test_an_image_that_cannot_fit_under_the_cgroup_limit_is_one_line(memory_cgroup, tiny_checkpoint, tmp_path):
    cgroup, peak_file = memory_cgroup
    process = _cli_in(cgroup, tiny_checkpoint, tmp_path, "--n_samples", "10000", "--H", "8192", "--W", "8192",
                      "--skip_grid")
    code, stderr, peak = _finish(process, peak_file)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (code, stderr[-2000:])
    assert "one 8192x8192 image needs about" in lines[0] and "GiB of host memory" in lines[0], lines[0]
    assert peak < LIMIT and not list(tmp_path.rglob("*.png"))


@pytest.mark.slow  # about 100 s on 2 cores: 3 images of 256x256 in parts
def test_ten_thousand_images_run_in_parts_under_the_cgroup_limit(memory_cgroup, tiny_checkpoint, tmp_path):
    """``--n_samples 10000``: parts, the first images written, never killed; stopped with SIGINT once 3 are out."""
    cgroup, peak_file = memory_cgroup
    process = _cli_in(cgroup, tiny_checkpoint, tmp_path, "--n_samples", "10000", "--H", "256", "--W", "256")
    folder = tmp_path / "out" / "a_photo"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and len(list(folder.glob("seed_*.png"))) < 3:
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    code, stderr, peak = _finish(process, peak_file)
    assert code != -signal.SIGKILL and "Traceback" not in stderr, (code, stderr[-2000:])
    written = sorted(p.name for p in folder.glob("seed_*.png"))
    assert written[:3] == ["seed_3_00000.png", "seed_4_00001.png", "seed_5_00002.png"], (written[:5], stderr[-2000:])
    assert "10000 images per batch" in stderr and "parts" in stderr, stderr[-2000:]
    assert peak < LIMIT, peak
    print(f"peak {peak / 2**20:.0f} MiB under {LIMIT / 2**20:.0f} MiB, exit {code}; "
          + next(line for line in stderr.splitlines() if "parts" in line))
