"""ldm.pipeline.input_checks and optimizedSD.atomic_files (input checks, atomic writes), as library functions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.errors import UsageError
from optimizedSD.atomic_files import TEMP_PREFIX, sigterm_as_interrupt, write_new_file
from ldm.pipeline.input_checks import (
    check_finite,
    check_input_file,
    check_prompt_weights,
    check_text,
    cut_to_bytes,
    open_init_image,
    read_text_file,
)

REPO = Path(__file__).resolve().parent.parent


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_invalid_utf8_from_the_command_line_is_one_line():
    argv_text = b"a cat \xff\xfe".decode("utf-8", "surrogateescape")  # what Python makes of bad argv bytes
    with pytest.raises(UsageError, match="--prompt is not valid UTF-8") as excinfo:
        check_text(argv_text, "--prompt")
    _one_line(excinfo)
    assert check_text("猫 🐱", "--prompt") == "猫 🐱"


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "too_big", "missing"])
def test_input_files_must_be_regular_and_small(tmp_path, kind):
    path = {"dev_zero": Path("/dev/zero"), "directory": tmp_path}.get(kind, tmp_path / "prompts.txt")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "too_big":
        with open(path, "wb") as handle:
            handle.truncate(2**30)  # sparse
    expected = {"fifo": "not a regular file", "dev_zero": "not a regular file", "directory": "not a regular file",
                "too_big": "at most 16 MiB", "missing": "not found"}[kind]
    started = time.perf_counter()
    with pytest.raises(UsageError, match=expected) as excinfo:
        read_text_file(path, "prompts file")
    assert time.perf_counter() - started < 5  # never blocks on the FIFO
    _one_line(excinfo)


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0..65532
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_init_image(path))
    expected = np.rint(ramp / 65535.0 * 255).astype(np.uint8)
    assert rgb.shape == (64, 256, 3) and np.array_equal(rgb[..., 0], expected)
    assert (rgb == 255).mean() < 0.01  # Pillow's own convert("RGB") makes 99.6 % of it white
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9


def test_float_tiff_is_scaled_from_0_1(tmp_path):
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = tmp_path / "float.tiff"
    Image.fromarray(values, mode="F").save(path)
    rgb = np.asarray(open_init_image(path))
    assert np.array_equal(rgb[..., 1], np.rint(values * 255).astype(np.uint8))


@pytest.mark.parametrize(("size", "mode"), [((13000, 13000), "1"), ((9000, 9000), "L"), ((64, 200000), "L")])
def test_huge_images_are_refused_from_the_header(tmp_path, size, mode):
    path = tmp_path / "big.png"
    Image.new(mode, size).save(path)  # all black: a few KB on disk
    assert path.stat().st_size < 2**20
    with pytest.raises(UsageError, match=f"is {size[0]}x{size[1]}") as excinfo:
        open_init_image(path)
    _one_line(excinfo)


@pytest.mark.parametrize(("text", "chars"), [("猫" * 100, 66), ("🐱" * 70, 50), ("a" * 300, 200), ("short", 5)])
def test_folder_names_are_cut_to_200_bytes_at_a_character_boundary(tmp_path, text, chars):
    name = cut_to_bytes(text)
    assert name == text[:chars] and len(name.encode("utf-8")) <= 200
    (tmp_path / name).mkdir()  # the file system takes it


def test_overflowing_weights_and_non_finite_scales_are_refused():
    with pytest.raises(UsageError, match="out of range"):
        check_prompt_weights([1e300, -1e300, 1.0], "a:1e300 b:-1e300 c:1")
    check_prompt_weights([1.3, -0.5], "fine")
    for bad in (float("nan"), float("inf"), 1e308):
        with pytest.raises(UsageError, match="--scale must be a finite number"):
            check_finite(bad, "--scale")
    assert check_finite(7.5, "--scale") == 7.5


# ----------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------


def test_write_new_file_never_replaces_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "00001.png"
    write_new_file(final, lambda handle: handle.write(b"first"))
    with pytest.raises(FileExistsError):
        write_new_file(final, lambda handle: handle.write(b"second"))
    assert final.read_bytes() == b"first"

    def fails(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_new_file(tmp_path / "00002.png", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001.png"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_during_a_write_leaves_no_partial_file_under_a_final_name(tmp_path, signum):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from optimizedSD.atomic_files import sigterm_as_interrupt, write_new_file

        def slow(handle):
            handle.write(b"x" * 1000)
            handle.flush()
            print("writing", flush=True)
            time.sleep(30)

        with sigterm_as_interrupt():
            try:
                write_new_file(Path({str(tmp_path)!r}) / "00001.png", slow)
            except KeyboardInterrupt:
                sys.exit(130)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"writing\n"
    process.send_signal(signum)
    assert process.wait(timeout=20) == (130 if signum != signal.SIGKILL else -signal.SIGKILL)
    names = [p.name for p in tmp_path.iterdir()]
    assert "00001.png" not in names
    assert all(name.startswith(TEMP_PREFIX) for name in names)  # SIGKILL alone may leave a temporary
    assert names == [] or signum == signal.SIGKILL


def test_sigterm_as_interrupt_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
