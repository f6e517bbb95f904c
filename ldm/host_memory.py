"""Host memory this process may still take, read before the kernel's OOM killer would have to act.

Used wherever a run is about to allocate in proportion to its input: a compressed zip checkpoint inflated
in memory (:mod:`ldm.checkpoints.zip_container`), a batch's parts (:mod:`ldm.ledger.batch_parts`).

A container's or a systemd slice's memory limit is not at the cgroup root but at the process's own cgroup,
named in ``/proc/self/cgroup``: ``0::/path`` under cgroup v2 (``<root>/path/memory.max`` less
``memory.current``), ``N:memory:/path`` under cgroup v1 (``<root>/memory/path/memory.limit_in_bytes`` less
``memory.usage_in_bytes``). Every cgroup from there up to the root is read, and the tightest one counts.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path, PurePosixPath

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_UNLIMITED = 2**62  # cgroup v1 writes "no limit" as the largest page count in bytes (9223372036854771712)


def host_available_bytes(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The least of ``MemAvailable``, the process's cgroup limit less its usage (:func:`cgroup_available_bytes`),
    and ``RLIMIT_DATA`` / ``RLIMIT_AS`` less what is used; off Linux, the free physical pages where the OS says,
    else None. ``proc`` and ``cgroup_root``: where /proc and the cgroup file systems are (tests pass fake trees)."""
    candidates = []
    meminfo = _proc_fields(proc / "meminfo")
    if "MemAvailable" in meminfo:
        candidates.append(meminfo["MemAvailable"])
    cgroup = cgroup_available_bytes(proc / "self" / "cgroup", cgroup_root)
    if cgroup is not None:
        candidates.append(cgroup)
    status = _proc_fields(proc / "self" / "status")
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


def cgroup_available_bytes(membership: Path, cgroup_root: Path) -> int | None:
    """What the cgroups named in ``membership`` (a ``/proc/<pid>/cgroup`` file) still allow: the least limit less
    usage over the process's memory cgroups (v2 and v1) and their ancestors; None without a limit or a file."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    headrooms: list[int] = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":  # cgroup v2's unified hierarchy
            headrooms += _headrooms(cgroup_root, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1's memory controller
            headrooms += _headrooms(cgroup_root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes")
    return min(headrooms) if headrooms else None


def _headrooms(mount: Path, path: str, limit_file: str, usage_file: str) -> list[int]:
    """Limit less usage of the cgroup at ``path`` under ``mount`` and of each ancestor that has a limit.

    A cgroup that is not there is skipped: in a container without a cgroup namespace ``/proc/self/cgroup``
    names the host's path (``/docker/<id>``) while the container's own cgroup is mounted as the root."""
    relative = PurePosixPath(path.strip().lstrip("/"))
    if ".." in relative.parts:
        return []
    found = []
    for folder in (relative, *relative.parents):
        limit = _read_bytes(mount / folder / limit_file)
        if limit is None or limit >= V1_UNLIMITED:  # "max" (v2) or the v1 "no limit" value, or no file
            continue
        found.append(limit - (_read_bytes(mount / folder / usage_file) or 0))
    return found


def _read_bytes(path: Path) -> int | None:
    """The number in a cgroup file; None for ``max``, a missing file or anything else."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _proc_fields(path: Path) -> dict[str, int]:
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
