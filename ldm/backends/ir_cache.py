"""Converted models kept on disk between runs (``--backend_cache``): a folder per key, holding OpenVINO's IR
(``model.xml`` + ``model.bin``, fp32 as converted) and ``entry.json``, which records the key and the sizes and
fingerprints of the two files.

Nothing here may fail a run: a folder that cannot be made, read or written costs a warning and a conversion;
an entry whose record does not match its files (stale: another key or OpenVINO version; corrupt: a file cut
short or overwritten) or that OpenVINO cannot read is removed and converted again. An entry is written under a
temporary name and renamed into place once complete, so a half-written entry never carries a final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ldm.checkpoints.hashes import checkpoint_fingerprint
from ldm.messages import describe_error

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a converted model computes or takes changes
MODEL_FILES = ("model.xml", "model.bin")
RECORD = "entry.json"


class IRCache:
    """A folder of converted models; ``folder=None`` caches nothing (every run converts)."""

    def __init__(self, folder: Path | None, openvino_version: str) -> None:
        self.folder = folder
        self.version = openvino_version

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / key

    def load(self, key: str, read: Callable[[Path], object]):
        """``read(xml_path)`` of the entry ``key`` (OpenVINO's ``Core.read_model``), or None when there is none or
        it cannot be used (then it is removed, so that the next store replaces it)."""
        entry = self.path(key)
        if entry is None or not entry.exists():
            return None
        try:
            problem = self._problem(entry, key)
            if problem is None:
                return read(entry / MODEL_FILES[0])
        except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: OpenVINO's reader on a bad file
            problem = f"unreadable ({describe_error(error)})"
        log.warning("OpenVINO cache entry %s is %s: converting again", entry, problem)
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def _problem(self, entry: Path, key: str) -> str | None:
        """Why the entry cannot be used, or None."""
        record = json.loads((entry / RECORD).read_text(encoding="utf-8"))
        if record.get("key") != key or record.get("format") != FORMAT or record.get("openvino") != self.version:
            return "stale"
        for name in MODEL_FILES:
            if record.get("files", {}).get(name) != file_record(entry / name):
                return f"corrupt ({name} changed)"
        return None

    def store(self, key: str, save: Callable[[Path], None]) -> Path | None:
        """``save(xml_path)`` into a new entry ``key``; the entry's folder, or None (with a warning) when the
        cache folder cannot take it."""
        final = self.path(key)
        if final is None:
            return None
        staging = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=final.parent))
            save(staging / MODEL_FILES[0])
            files = {name: file_record(staging / name) for name in MODEL_FILES}
            record = {"key": key, "format": FORMAT, "openvino": self.version, "files": files}
            (staging / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
            if final.exists():  # a stale entry left by a run that could not remove it
                shutil.rmtree(final)
            os.replace(staging, final)
            return final
        except (OSError, RuntimeError) as error:  # RuntimeError: OpenVINO's writer (a full disk)
            log.warning("OpenVINO cache %s cannot be written (%s): the conversion is not kept",
                        self.folder, describe_error(error))
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            return None


def file_record(path: Path) -> list:
    """Size and fingerprint (sha256 of the size, the first and the last MB) of one file of an entry."""
    return [path.stat().st_size, checkpoint_fingerprint(path)]

