"""Giving back the pages of a memory-mapped checkpoint once its weights have been copied out.

The checkpoint reader maps ``.safetensors`` and zip ``.ckpt`` files privately (``MAP_PRIVATE``); the loader
copies every weight out of that map (:func:`ldm.loading.stable_diffusion.owned_copy`), so a file rewritten during the run
cannot kill it with SIGBUS. Reading a weight to copy it brings its pages into the process, and the map lives
until the last tensor of the file is gone: without help, the load's peak would hold the whole file twice
(the copies and the mapped pages). ``madvise(MADV_DONTNEED)`` on a private file mapping drops the pages from
the process; they stay in the page cache, and anything that read them again would fault in the file's bytes,
which are what was there: nothing writes into a mapped weight (the weight checks and the copy only read).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

MADV_DONTNEED = 4


class FileMappings:
    """The process's private file mappings, read once; :meth:`drop` gives back the pages under a tensor."""

    def __init__(self) -> None:
        self.libc, self.ranges = None, []
        if not sys.platform.startswith("linux"):
            return
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            with open("/proc/self/maps") as maps:
                for line in maps:  # "start-end perms offset dev inode path"
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                        start, end = (int(a, 16) for a in fields[0].split("-"))
                        self.ranges.append((start, end))
        except (OSError, AttributeError):
            self.libc = None

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s first byte lies in a private file mapping (a view into a checkpoint's map)."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        start = tensor.data_ptr()
        return any(lo <= start < hi for lo, hi in self.ranges)

    def drop(self, tensor: torch.Tensor) -> int:
        """Bytes given back: the whole pages inside ``tensor``'s bytes, when they lie in one private file
        mapping (0 for anything else: heap memory, a CUDA tensor, another OS)."""
        if self.libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return 0
        page = mmap.PAGESIZE
        first = -(-tensor.data_ptr() // page) * page
        last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
        if last <= first or not any(lo <= first and last <= hi for lo, hi in self.ranges):
            return 0
        if self.libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
            return 0
        return last - first
