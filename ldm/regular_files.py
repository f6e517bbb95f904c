"""Files the user names (configs, prompts files, init images) must be regular files: a FIFO, a device
(``/dev/zero``) or a directory would hang a read or never end it. One check, one wording, for every caller;
and one reader for the text files among them (configs, prompts files): size-capped, UTF-8."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def require_regular_mode(mode: int, error: type[Exception], message: str) -> None:
    """Raise ``error(message)`` unless ``mode`` (an ``st_mode`` from ``stat`` or ``fstat``) is a regular file's."""
    if not stat.S_ISREG(mode):
        raise error(message)


def regular_file_size(path: Path, shown: str, what: str, error: type[Exception], missing: str | None = None) -> int:
    """The size of ``path`` if it is a regular file; otherwise ``error`` with one line naming ``what``
    (``missing``: the wording for a file that does not exist, default ``"<what> not found"``)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{missing or what + ' not found'}: {shown}") from None
    except OSError as failure:
        raise error(f"cannot read {what} {shown}: {failure.strerror or failure}") from None
    require_regular_mode(info.st_mode, error, f"cannot read {what} {shown}: not a regular file")
    return info.st_size


def read_utf8_text(path: Path, shown: str, what: str, error: type[Exception], max_bytes: int,
                   missing: str | None = None, limit_note: str = "") -> str:
    """The UTF-8 text of the regular file ``path`` of at most ``max_bytes``, read with that cap (the file may grow
    while it is read); every failure is ``error`` with one line (``limit_note``: why the cap, for that line)."""
    size = regular_file_size(path, shown, what, error, missing)
    note = f" ({limit_note})" if limit_note else ""
    if size > max_bytes:
        raise error(f"cannot read {what} {shown}: {_amount(size)}, at most {_amount(max_bytes)}{note}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"cannot read {what} {shown}: it grew past {_amount(max_bytes)} while being read{note}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"cannot read {what} {shown}: not UTF-8 text (byte {failure.start})") from None


def _amount(size: int) -> str:
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size} bytes"
