"""Host memory this process may still take, read before the kernel's OOM killer would have to act.

Used wherever a run is about to allocate in proportion to its input: a compressed zip checkpoint inflated
in memory (:mod:`ldm.checkpoints.zip_container`), a batch's parts (:mod:`ldm.ledger.batch_parts`).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def host_available_bytes() -> int | None:
    """The least of ``MemAvailable``, the cgroup's ``memory.max`` less its ``memory.current``, and
    ``RLIMIT_DATA`` / ``RLIMIT_AS`` less what is used; off Linux, the free physical pages where the OS says,
    else None."""
    candidates = []
    meminfo = _proc_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        candidates.append(meminfo["MemAvailable"])
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            candidates.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    status = _proc_fields("/proc/self/status")
    for rlimit, used in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(rlimit)[0]
        if soft != resource.RLIM_INFINITY and used in status:
            candidates.append(soft - status[used])
    if candidates:
        return max(0, min(candidates))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _proc_fields(path: str) -> dict[str, int]:
    """``Name:  123 kB`` lines of a /proc file, in bytes."""
    fields = {}
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields
