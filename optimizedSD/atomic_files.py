"""Files that appear whole or not at all, and SIGTERM handled like Ctrl-C.

A PNG written straight to its final name and interrupted (Ctrl-C, SIGTERM from a job scheduler, a full
disk) leaves a truncated image that looks like a result. Here each file is written to an exclusively
created temporary name in the same folder, flushed and fsynced, then *linked* to its final name:
``os.link`` fails if that name exists, so another run writing into the same folder is never clobbered,
and the final name only ever points at complete data. The temporary name is removed in every case.
SIGKILL cannot be caught: it can leave a ``.tmp-*`` file, never a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["write_new_file", "sigterm_as_interrupt", "TEMP_PREFIX"]

TEMP_PREFIX = ".tmp-"


def _temporary(folder: Path, final_name: str) -> tuple[Path, BinaryIO]:
    for attempt in range(1000):
        candidate = folder / f"{TEMP_PREFIX}{os.getpid()}-{attempt}-{final_name}"
        try:
            return candidate, open(candidate, "xb")
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def write_new_file(final: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``final`` through ``write(handle)``; raises ``FileExistsError`` (nothing changed) if it exists.

    Other ``OSError``s (full disk, read-only folder) propagate after the temporary file is removed.
    """
    temporary, handle = _temporary(final.parent, final.name)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, final)  # atomic, and never replaces an existing file
    finally:
        temporary.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises ``KeyboardInterrupt``, so it cleans up exactly as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
