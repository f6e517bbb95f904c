"""Check a PyTorch zip checkpoint's container before ``torch.load`` reads it.

torch reads these files with miniz and, under ``mmap=True``, takes each tensor's bytes straight from
the mapped file at the record's offset: a deflate-compressed record is then read as raw floats, and
nothing checks a CRC (a bit-flipped download loads). So, from the central directory, before torch
opens the file:

- the entry count (read from the end-of-central-directory record, before Python's ``zipfile`` builds a
  table of them) is bounded, names are unique, no record is encrypted, every record lives under one
  archive folder, and nothing precedes the archive (miniz and ``zipfile`` would then disagree on offsets);
- ``data.pkl`` is small enough to hold in memory (torch reads it whole);
- every record's CRC-32 is checked by streaming it in 1 MiB pieces (:func:`verify_crcs`);
- compressed records (``torch.save`` never writes them; a re-zipped file has them) must decompress to
  something that fits in the host's available memory at a plausible ratio: the reader then loads such a
  file without mmap, where miniz inflates them.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ldm.checkpoints.errors import ZipRefused
from ldm.checkpoints.pickle_limits import MAX_PICKLE_MEMORY
from ldm.host_memory import host_available_bytes
from ldm.messages import escaped

__all__ = ["TorchZipLayout", "inspect_torch_zip", "verify_crcs"]

MAX_RECORDS = 200_000  # an SD v1 training file with optimizer state has ~5,000
MAX_COMPRESSION_RATIO = 20  # float weights deflate to ~0.9x; a zip bomb to ~0.001x
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CHUNK = 2**20


def _damaged(detail: str) -> ZipRefused:
    return ZipRefused(f"the file is damaged or truncated ({detail})")


@dataclass(frozen=True)
class TorchZipLayout:
    """What the reader needs from the central directory."""

    storage_sizes: dict[str, int]  # storage key -> uncompressed bytes of data/<key>
    compressed: bool  # some record is deflated: load without mmap
    infos: tuple[zipfile.ZipInfo, ...]


def _directory_bounds(file: Path, size: int) -> tuple[int, int, int]:
    """(entries, start of the central directory, where it must end) from the end records."""
    with open(file, "rb") as handle:
        tail_start = max(0, size - (_EOCD.size + 65535))
        handle.seek(tail_start)
        tail = handle.read()
        position = tail.rfind(b"PK\x05\x06")
        if position < 0 or len(tail) - position < _EOCD.size:
            raise _damaged("no zip end record")
        _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, position)
        eocd_at = tail_start + position
        directory_end = eocd_at
        if position >= _ZIP64_LOCATOR.size and tail[position - _ZIP64_LOCATOR.size:].startswith(b"PK\x06\x07"):
            _, _, zip64_at, _ = _ZIP64_LOCATOR.unpack_from(tail, position - _ZIP64_LOCATOR.size)
            if zip64_at + _ZIP64_EOCD.size > size:
                raise _damaged("the zip64 end record points outside the file")
            handle.seek(zip64_at)
            record = handle.read(_ZIP64_EOCD.size)
            if len(record) < _ZIP64_EOCD.size or not record.startswith(b"PK\x06\x06"):
                raise _damaged("bad zip64 end record")
            fields = _ZIP64_EOCD.unpack(record)
            entries, cd_size, cd_offset, directory_end = fields[7], fields[8], fields[9], zip64_at
    if cd_offset + cd_size != directory_end:
        raise ZipRefused("the zip directory is not where its end record says (data before the archive?)")
    return entries, cd_offset, directory_end


def inspect_torch_zip(file: Path, size: int) -> TorchZipLayout:
    """Check the container (see the module docstring); raises :class:`ZipRefused`."""
    entries, _, _ = _directory_bounds(file, size)
    if entries > MAX_RECORDS:
        raise ZipRefused(f"the zip archive lists {entries} records (at most {MAX_RECORDS})")
    try:
        with zipfile.ZipFile(file) as archive:
            infos = tuple(archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as error:
        raise _damaged(f"zip directory: {escaped(error, 120)}") from None
    if len(infos) != entries:  # miniz sizes its tables by the count, zipfile walks the directory
        raise _damaged(f"the zip end record counts {entries} records, the directory lists {len(infos)}")
    names = [info.filename for info in infos]
    if not names or len(set(names)) != len(names):
        raise ZipRefused("the zip archive is empty or lists a record twice")
    prefix = names[0].split("/", 1)[0] + "/"
    storage_sizes: dict[str, int] = {}
    compressed = False
    for info in infos:
        if not info.filename.startswith(prefix):
            raise ZipRefused("the zip archive's records are not in one folder")
        if info.flag_bits & 0x1:
            raise ZipRefused(f"record {escaped(info.filename)} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ZipRefused(f"record {escaped(info.filename)} uses a compression torch cannot read")
        if info.compress_type != zipfile.ZIP_STORED:
            compressed = True
            if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
                raise ZipRefused(f"record {escaped(info.filename)} decompresses {info.file_size // max(info.compress_size, 1)}x (a zip bomb?)")
        if info.header_offset + info.compress_size > size:
            raise _damaged(f"record {escaped(info.filename)} runs past the end of the file")
        name = info.filename[len(prefix):]
        if name.startswith("data/"):
            storage_sizes[name[len("data/"):]] = info.file_size
        elif name == "data.pkl" and info.file_size > MAX_PICKLE_MEMORY:
            raise ZipRefused(f"its data.pkl is {info.file_size // 2**20} MiB (at most {MAX_PICKLE_MEMORY // 2**20})")
    if prefix + "data.pkl" not in names:
        raise ZipRefused("a zip archive without data.pkl: not a PyTorch checkpoint")
    if compressed:
        inflated = sum(info.file_size for info in infos)
        available = host_available_bytes()
        if available is not None and inflated > available:
            raise ZipRefused(
                f"its records are compressed and need {inflated / 2**30:.1f} GiB of memory to read "
                f"({available / 2**30:.1f} GiB available); re-save it with torch.save or as .safetensors"
            )
    return TorchZipLayout(storage_sizes=storage_sizes, compressed=compressed, infos=infos)


def verify_crcs(file: Path, layout: TorchZipLayout) -> None:
    """Read every record once, in 1 MiB pieces, and check its CRC-32 (``zipfile`` does at each record's end)."""
    with zipfile.ZipFile(file) as archive:
        for info in layout.infos:
            try:
                with archive.open(info) as record:
                    while record.read(_CHUNK):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
                raise _damaged(f"record {escaped(info.filename)}: {escaped(error, 120)}") from None
