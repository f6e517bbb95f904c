"""The budgets of one checkpoint's unpickling, and the file view that charges reads against them.

Every opcode the unpickler runs, every byte it reads and every storage the file declares is charged here
(see ``ldm.checkpoints.unpickler``), so that a crafted pickle is refused before it allocates, not after.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from ldm.checkpoints.errors import PickleRefused
from ldm.messages import escaped

__all__ = ["PickleLimits", "BoundedReader", "MAX_PICKLE_MEMORY", "MAX_DEPTH", "MAX_LINE"]

MAX_PICKLE_MEMORY = 256 * 2**20  # estimated bytes of Python objects one checkpoint's pickles may build
MAX_DEPTH = 64  # containers inside containers; SD v1 files nest fewer than 10 deep
MAX_LINE = 64 * 2**10  # protocol-0 text opcodes (GLOBAL's module and name, INT, ...)
OPCODE_COST = 64  # bytes: a stack slot plus a small object
CONTAINER_COST = 256  # an empty dict / set / list with its first slots
ITEM_COST = 96  # one more dict or set entry
_SMALL_READ = 4096  # reads up to this size are opcode arguments, charged with their opcode


class PickleLimits:
    """Budgets shared by every unpickler of one ``torch.load`` (the legacy format runs five pickles).

    ``record_sizes``: zip format, ``{storage key: bytes in data/<key>}``. ``file_bytes``: legacy format,
    how many bytes the file has for storages (they follow the pickles).
    """

    def __init__(self, record_sizes: dict[str, int] | None = None, file_bytes: int = 0) -> None:
        self.memory_left = MAX_PICKLE_MEMORY
        self.record_sizes = record_sizes
        self.storage_bytes_left = file_bytes
        self.storage_roots: set[str] = set()

    def charge(self, nbytes: int) -> None:
        self.memory_left -= nbytes
        if self.memory_left < 0:
            raise PickleRefused(f"its pickle builds more than {MAX_PICKLE_MEMORY // 2**20} MiB of objects")

    def check_storage(self, pid: Any) -> None:
        """Refuse a persistent id that is not a storage the file really holds, before torch allocates it."""
        zip_format = self.record_sizes is not None
        if type(pid) is not tuple or len(pid) != (5 if zip_format else 6) or pid[0] != "storage":
            raise PickleRefused("it references data that is not a tensor storage")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, torch.serialization.StorageType):
            raise PickleRefused("a tensor storage without a dtype")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise PickleRefused("a malformed tensor storage reference")
        nbytes = numel * torch._utils._element_size(storage_type.dtype)
        if zip_format:
            if nbytes > self.record_sizes.get(key, -1):
                raise pickle.UnpicklingError(f"tensor data record {escaped(key)} is missing or smaller than declared")
            return
        view = pid[5]
        if view is not None:
            if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str:
                raise PickleRefused("a malformed tensor storage view")
            offset, size = view[1], view[2]
            if type(offset) is not int or type(size) is not int or offset < 0 or size < 0 or offset + size > numel:
                raise PickleRefused("a tensor storage view outside its storage")
        if key not in self.storage_roots:
            self.storage_roots.add(key)
            self.storage_bytes_left -= nbytes
            if self.storage_bytes_left < 0:
                raise pickle.UnpicklingError("it declares more tensor data than the file holds")


class BoundedReader:
    """The unpickler's view of the file: no read longer than what is left, no unbounded line."""

    def __init__(self, file: Any, limits: PickleLimits) -> None:
        self._file = file
        self._limits = limits
        position = file.tell()
        self._end = file.seek(0, io.SEEK_END)
        file.seek(position)

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= _SMALL_READ:  # opcode arguments: a short read just ends the pickle early
            return self._file.read(size)
        if size < 0 or size > self._end - self._file.tell():
            raise pickle.UnpicklingError("the pickle declares more data than the file holds")
        self._limits.charge(size)
        return self._file.read(size)

    def readline(self) -> bytes:
        line = self._file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise PickleRefused(f"a pickle text line longer than {MAX_LINE} bytes")
        self._limits.charge(len(line))
        return line
