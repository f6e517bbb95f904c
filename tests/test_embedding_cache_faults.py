"""``--embedding_cache`` never fails a run: every fault of it is one warning line, the image is the one a run
without the cache makes, and a bad entry is replaced where the folder is writable.

Faults made for real: damaged entries (another shape, dtype or key set, NaN), a folder or a FIFO where an entry
file belongs, and, where the test may mount a tmpfs (root on Linux), a read-only file system and a full one.
Faults injected (marked so in each test): a read-only or full disk at the write call (``save_file`` raising what
safetensors raises, or a plain ``OSError``), and an unreadable folder when the tests run as root (root reads
through permissions; as another user the folder is made unreadable with ``chmod``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm.conditioning import embedding_cache
from optimizedSD import optimized_txt2img

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"
WIDTH = 32  # the tiny text encoder's hidden size
ROWS = 77  # the prompt and the empty negative prompt are one chunk each


def _argv(ckpt: Path, outdir: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--ddim_steps", "1", "--n_samples", "1", "--sampler", "ddim", "--seed", "5",
            "--skip_grid", "--no-watermark", "--prompt", "a cached cat", *extra]


def _image(outdir: Path) -> np.ndarray:
    (path,) = outdir.rglob("*.png")
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory) -> np.ndarray:
    """The image of a run without ``--embedding_cache``."""
    outdir = tmp_path_factory.mktemp("no_cache")
    assert optimized_txt2img.main(_argv(tiny_checkpoint, outdir)) == 0
    return _image(outdir)


def _cached_run(ckpt: Path, cache: Path, outdir: Path, caplog) -> list[str]:
    """One run with ``cache``: exit 0; its warning lines."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert optimized_txt2img.main(_argv(ckpt, outdir, "--embedding_cache", str(cache))) == 0
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def _one_warning(warnings: list[str], *fragments: str) -> str:
    assert len(warnings) == 1, warnings
    (line,) = warnings
    assert "\n" not in line and line.startswith("--embedding_cache ") and "the run goes on" in line, line
    assert all(fragment in line for fragment in fragments), line
    return line


def _populated(ckpt: Path, cache: Path, outdir: Path, reference: np.ndarray, caplog) -> list[Path]:
    """A first run fills the cache: no warning, the reference image, two entries (prompt, negative prompt)."""
    assert _cached_run(ckpt, cache, outdir, caplog) == []
    assert np.array_equal(_image(outdir), reference)
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 2
    return entries


def _damage(entry: Path, kind: str) -> None:
    entry.unlink()
    if kind == "directory":
        entry.mkdir()
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        tensors = {
            "width": {"encoding": torch.randn(ROWS, 16)},  # today's "mat1 and mat2 shapes cannot be multiplied"
            "rows": {"encoding": torch.randn(2 * ROWS, WIDTH)},  # two chunks where the text makes one
            "rank": {"encoding": torch.randn(ROWS * WIDTH)},
            "dtype": {"encoding": torch.randn(ROWS, WIDTH, dtype=torch.float64)},
            "keys": {"encoding": torch.randn(ROWS, WIDTH), "extra": torch.zeros(1)},
            "other_key": {"something": torch.randn(ROWS, WIDTH)},
            "nan": {"encoding": torch.full((ROWS, WIDTH), float("nan"))},
        }[kind]
        save_file(tensors, str(entry))


@pytest.mark.parametrize("kind", ["width", "rows", "rank", "dtype", "keys", "other_key", "nan", "directory", "fifo"])
def test_bad_entries_are_computed_again_and_replaced(tiny_checkpoint, tmp_path, caplog, reference, kind):
    cache = tmp_path / "cache"
    entries = _populated(tiny_checkpoint, cache, tmp_path / "first", reference, caplog)
    for entry in entries:
        _damage(entry, kind)
    warnings = _cached_run(tiny_checkpoint, cache, tmp_path / "second", caplog)
    _one_warning(warnings, "2 entries unusable, computed again")
    assert np.array_equal(_image(tmp_path / "second"), reference)
    for entry in entries:  # replaced by good entries
        assert stat.S_ISREG(os.stat(entry).st_mode)
        assert load_file(str(entry))["encoding"].shape == (ROWS, WIDTH)
    assert not list(cache.glob("*.tmp"))
    if kind in ("width", "directory", "fifo"):  # the replacements are used as they are
        assert _cached_run(tiny_checkpoint, cache, tmp_path / "third", caplog) == []
        assert np.array_equal(_image(tmp_path / "third"), reference)


def test_a_folder_with_files_in_the_way_is_left_alone(tiny_checkpoint, tmp_path, caplog, reference):
    cache = tmp_path / "cache"
    entries = _populated(tiny_checkpoint, cache, tmp_path / "first", reference, caplog)
    for entry in entries:
        entry.unlink()
        entry.mkdir()
        (entry / "keep.txt").write_text("the user's")
    warnings = _cached_run(tiny_checkpoint, cache, tmp_path / "second", caplog)
    _one_warning(warnings, "2 entries unusable, computed again (not a regular file)", "2 entries not written")
    assert np.array_equal(_image(tmp_path / "second"), reference)
    assert all((entry / "keep.txt").read_text() == "the user's" for entry in entries)


@pytest.mark.parametrize("fault", [
    SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30) at path \"x\""),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.EROFS, os.strerror(errno.EROFS)),
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
], ids=["safetensors_erofs", "safetensors_enospc", "oserror_erofs", "oserror_enospc"])
def test_an_unwritable_or_full_cache_injected_at_the_write(tiny_checkpoint, tmp_path, caplog, reference, monkeypatch,
                                                            fault):
    """Injected: ``save_file`` (the write call) raises what safetensors raises on a read-only or full disk."""
    def failing_save(tensors, filename):
        raise fault

    monkeypatch.setattr(embedding_cache, "save_file", failing_save)
    cache = tmp_path / "cache"
    warnings = _cached_run(tiny_checkpoint, cache, tmp_path / "out", caplog)
    reason = "Read-only file system" if "30" in str(fault) or "EROFS" in errno.errorcode.get(fault.args[0], "") else (
        "No space left on device")
    _one_warning(warnings, "2 entries not written", reason)
    assert np.array_equal(_image(tmp_path / "out"), reference)
    assert not list(cache.iterdir())


def test_an_unreadable_cache(tiny_checkpoint, tmp_path, caplog, reference, monkeypatch):
    """As root (permissions do not stop root) the read is injected to fail with EACCES; otherwise ``chmod 0``."""
    cache = tmp_path / "cache"
    _populated(tiny_checkpoint, cache, tmp_path / "first", reference, caplog)
    if os.geteuid() == 0:
        def unreadable(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(embedding_cache, "safe_open", unreadable)
    else:
        cache.chmod(0)
    try:
        warnings = _cached_run(tiny_checkpoint, cache, tmp_path / "second", caplog)
    finally:
        cache.chmod(0o755)
    _one_warning(warnings, "2 entries unusable", "Permission denied")
    assert np.array_equal(_image(tmp_path / "second"), reference)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.mark.parametrize("case", ["read_only", "read_only_with_bad_entries", "full"])
def test_a_real_read_only_or_full_file_system(tiny_checkpoint, tmp_path, caplog, reference, case):
    """A tmpfs mounted read-only, or of one 4 KiB page (an entry is about 10 KiB): made for real, not injected."""
    cache = tmp_path / "mount"
    _mount_tmpfs(cache, "size=4k" if case == "full" else "size=1m")
    try:
        if case == "read_only_with_bad_entries":
            for entry in _populated(tiny_checkpoint, cache, tmp_path / "first", reference, caplog):
                _damage(entry, "nan")
        if case != "full":
            subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        warnings = _cached_run(tiny_checkpoint, cache, tmp_path / "out", caplog)
        reason = "No space left on device" if case == "full" else "Read-only file system"
        line = _one_warning(warnings, "2 entries not written", reason)
        assert ("2 entries unusable" in line) == (case == "read_only_with_bad_entries"), line
        assert np.array_equal(_image(tmp_path / "out"), reference)
        assert not list(cache.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(cache)], check=False)
