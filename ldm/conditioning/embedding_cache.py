"""Text encodings kept on disk between runs (the idea of the prompt caches of SD front ends).

The cache only saves time, so no fault of it may fail a run: a folder that cannot be read or written, a full
disk, a folder or FIFO where an entry file belongs, an entry of another shape, dtype or key set, or holding NaN.
Each such entry is computed again (and replaced where the folder is writable); :meth:`EmbeddingCache.fault_line`
sums the run's faults up in one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.messages import escaped, one_line

log = logging.getLogger(__name__)
ENTRY_KEY = "encoding"  # the one tensor an entry file holds
_OS_ERROR = re.compile(r"([^:]+?) \(os error \d+\)")  # safetensors' wording of an OSError


class EmbeddingCache:
    """Text encodings kept on disk between runs (the idea of the prompt caches of SD front ends).

    One safetensors file per (checkpoint, dtype, text): ``<dir>/<sha256>.safetensors`` holding ``[77 * chunks, D]``.
    :class:`PromptEncoder` puts everything else that changes an encoding (syntax, clip skip, embeddings) into
    the text it passes here, and the shape the text's encoding has into :meth:`get`.
    An entry that cannot be used is recomputed and rewritten; an entry that cannot be written is skipped. Both
    are counted (``unusable``, ``unwritten``: the reason of each) for the one line of :meth:`fault_line`.
    """

    def __init__(self, directory: str | os.PathLike, checkpoint_key: str, dtype: torch.dtype) -> None:
        self.directory = Path(directory)
        self.checkpoint_key = checkpoint_key
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.unusable: list[str] = []
        self.unwritten: list[str] = []

    def _path(self, text: str) -> Path:
        key = hashlib.sha256("\0".join((self.checkpoint_key, self.dtype_name, text)).encode("utf-8")).hexdigest()
        return self.directory / f"{key}.safetensors"

    def get(self, text: str, shape: tuple[int | None, int | None] = (None, None)) -> torch.Tensor | None:
        """The cached encoding of ``text``, or None when there is none or it cannot be used.

        ``shape``: the ``(rows, width)`` the encoder would produce (None: not known); an entry of any other
        shape is refused before its data is read."""
        path = self._path(text)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError as error:  # an unreadable folder
            self.unusable.append(_reason(error))
            return None
        try:
            if not stat.S_ISREG(mode):
                raise ValueError("not a regular file")  # a FIFO would hang the read, a folder fail it
            return self._read(path, shape)
        except Exception as error:  # a torn, foreign or damaged file: recompute (and replace) rather than fail
            self.unusable.append(_reason(error))
            return None

    def _read(self, path: Path, shape: tuple[int | None, int | None]) -> torch.Tensor:
        with safe_open(str(path), "pt") as entry:
            keys = sorted(entry.keys())
            if keys != [ENTRY_KEY]:
                raise ValueError(f"keys {escaped(', '.join(keys), 60) or 'none'}")
            stored = tuple(entry.get_slice(ENTRY_KEY).get_shape())
            if len(stored) != 2 or any(want is not None and want != got for want, got in zip(shape, stored)):
                raise ValueError(f"shape {stored}")
            encoding = entry.get_tensor(ENTRY_KEY)
        if str(encoding.dtype).removeprefix("torch.") != self.dtype_name:
            raise ValueError(f"dtype {str(encoding.dtype).removeprefix('torch.')}")
        if not bool(torch.isfinite(encoding).all()):
            raise ValueError("NaN or infinite values")
        return encoding

    def put(self, text: str, encoding: torch.Tensor) -> None:
        """Write ``text``'s encoding, whole or not at all; a failure is counted, never raised."""
        path = self._path(text)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            save_file({ENTRY_KEY: encoding.detach().to("cpu").contiguous()}, str(tmp))
            try:
                os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
            except IsADirectoryError:
                path.rmdir()  # an empty folder where the entry belongs; a folder with files in it is left alone
                os.replace(tmp, path)
        except Exception as error:  # read-only, full, a folder in the way: the cache is an optimisation
            self.unwritten.append(_reason(error))
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the folder itself is unusable: nothing was left in it to remove
                pass

    def fault_line(self) -> str | None:
        """One line for every fault met so far (how many entries were unusable, how many not written, and why),
        or None when there was none."""
        parts = []
        if self.unusable:
            parts.append(f"{_entries(len(self.unusable))} unusable, computed again ({_reasons(self.unusable)})")
        if self.unwritten:
            parts.append(f"{_entries(len(self.unwritten))} not written ({_reasons(self.unwritten)})")
        if not parts:
            return None
        return one_line(f"--embedding_cache {escaped(self.directory)}: {'; '.join(parts)}; the run goes on")


def _reason(error: BaseException) -> str:
    """A short reason: an OSError's text ("Read-only file system"), also where safetensors wraps it."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    wrapped = _OS_ERROR.search(text)
    return wrapped.group(1).strip() if wrapped else escaped(text.splitlines()[0] if text else type(error).__name__, 80)


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _reasons(reasons: list[str]) -> str:
    distinct = list(dict.fromkeys(reasons))
    return ", ".join(distinct[:3]) + (f" and {len(distinct) - 3} more" if len(distinct) > 3 else "")
