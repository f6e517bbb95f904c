"""The checkpoints the server offers (``--ckpt`` and the files in ``--ckpt_dir``), named as the webui names them:
``GET /sdapi/v1/sd-models`` entries (``title``, ``model_name``, ``hash``, ``sha256``, ``filename``, ``config``)
and the ``sd_model_checkpoint`` option, which takes a title, a model name, a file name or a path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.checkpoints.diffusers_folders import is_diffusers_folder
from ldm.checkpoints.hashes import file_sha256_once
from ldm.errors import UsageError

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """One offered checkpoint: its title (the name under ``--ckpt_dir``, or the file name) and its path."""

    title: str
    path: Path

    @property
    def model_name(self) -> str:
        return Path(self.title).with_suffix("").as_posix() if self.path.is_file() else self.title

    def entry(self, hashed: bool) -> dict[str, Any]:
        """Its ``sd-models`` entry; ``hashed``: with its sha256 (read for the loaded one only, as the webui does:
        hashing every offered file would read gigabytes at each listing)."""
        sha256 = file_sha256_once(self.path) if hashed and self.path.is_file() else None
        return {"title": self.title, "model_name": self.model_name, "hash": sha256[:8] if sha256 else None,
                "sha256": sha256, "filename": str(self.path.resolve()), "config": None}

    def names(self) -> set[str]:
        """What ``sd_model_checkpoint`` may say to mean it (with or without the webui's ``[hash]`` suffix)."""
        return {self.title, self.model_name, self.path.name, str(self.path), str(self.path.resolve())}


class CheckpointList:
    """The offered checkpoints; ``refresh`` reads ``--ckpt_dir`` again (``POST /refresh-checkpoints``)."""

    def __init__(self, ckpt: Path | None, folder: Path | None) -> None:
        self.ckpt, self.folder = ckpt, folder
        self.items: list[Checkpoint] = []
        self.refresh()

    def refresh(self) -> None:
        found: list[Checkpoint] = []
        if self.folder is not None:
            for path in sorted(self.folder.rglob("*")):
                if path.suffix in CHECKPOINT_SUFFIXES and path.is_file() or is_diffusers_folder(path):
                    found.append(Checkpoint(path.relative_to(self.folder).as_posix(), path))
        if self.ckpt is not None and all(c.path.resolve() != self.ckpt.resolve() for c in found):
            found.insert(0, Checkpoint(self.ckpt.name, self.ckpt))
        self.items = found

    def find(self, name: str) -> Checkpoint:
        """The checkpoint ``name`` means; an unknown name is a :class:`UsageError` listing the titles."""
        bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        for item in self.items:
            if name in item.names() or bare in item.names():
                return item
        titles = ", ".join(item.title for item in self.items) or "none (give --ckpt or --ckpt_dir)"
        raise UsageError(f"sd_model_checkpoint {name!r} is not one of: {titles}")

    def first(self) -> Checkpoint:
        if not self.items:
            raise UsageError("no checkpoint to serve: give --ckpt FILE or --ckpt_dir DIR with .ckpt/.safetensors files")
        return self.items[0]
