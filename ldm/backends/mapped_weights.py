"""Giving back the pages of a converted model's weight file once the compiled model holds its own copy.

OpenVINO maps ``model.bin`` read-only (``Core.read_model``); compiling for the CPU reads every weight and
repacks the large ones into the plugin's own memory, but the compiled model keeps the map, so without help a
run holds the weights twice (the file's pages and the repacked copy: 6.6 GB of RSS for SD v1's 3.4 GB UNet).
``madvise(MADV_DONTNEED)`` drops those clean pages from the process; they stay in the page cache, and the few
the plugin reads again (biases, norms) fault back in with the file's bytes, which nothing writes (the same
reasoning as :mod:`ldm.checkpoints.mapped_pages` for checkpoints; only read-only mappings are advised).
:func:`dropping_pages` does it every few tenths of a second while a compile runs, so that the peak does not
hold the whole file next to the repacked copy either.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DROP_EVERY_S = 0.2

from ldm.checkpoints.mapped_pages import MADV_DONTNEED


def drop_file_pages(path: Path) -> int:
    """Bytes given back: every read-only mapping of ``path`` in this process, advised away (0 off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    target = os.path.realpath(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return 0
    dropped = 0
    for line in lines:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5].rstrip("\n") != target or "w" in fields[1]:
            continue
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


@contextmanager
def dropping_pages(path: Path, every_s: float = DROP_EVERY_S) -> Iterator[None]:
    """Give back ``path``'s mapped pages every ``every_s`` seconds during the block, and once after it."""
    done = threading.Event()

    def drop_until_done() -> None:
        while not done.wait(every_s):
            drop_file_pages(path)

    dropper = threading.Thread(target=drop_until_done, name="drop-model-pages", daemon=True)
    dropper.start()
    try:
        yield
    finally:
        done.set()
        dropper.join()
        drop_file_pages(path)
