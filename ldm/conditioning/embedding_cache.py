"""Text encodings kept on disk between runs (the idea of the prompt caches of SD front ends)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Text encodings kept on disk between runs (the idea of the prompt caches of SD front ends).

    One safetensors file per (checkpoint, dtype, text): ``<dir>/<sha256>.safetensors`` holding ``[77 * chunks, D]``.
    :class:`PromptEncoder` puts everything else that changes an encoding (syntax, clip skip, embeddings) into
    the text it passes here.
    A file that cannot be read is ignored and rewritten.
    """

    def __init__(self, directory: str | os.PathLike, checkpoint_key: str, dtype: torch.dtype) -> None:
        self.directory = Path(directory)
        self.checkpoint_key = checkpoint_key
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, text: str) -> Path:
        key = hashlib.sha256("\0".join((self.checkpoint_key, self.dtype_name, text)).encode("utf-8")).hexdigest()
        return self.directory / f"{key}.safetensors"

    def get(self, text: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(text)
        if not path.is_file():
            return None
        try:
            encoding = load_file(str(path))["encoding"]
            if encoding.ndim != 2 or str(encoding.dtype).removeprefix("torch.") != self.dtype_name:
                raise ValueError(f"a {str(encoding.dtype).removeprefix('torch.')} tensor of shape {tuple(encoding.shape)}")
            if not bool(torch.isfinite(encoding).all()):
                raise ValueError("NaN or infinite values")
            return encoding
        except Exception as error:  # a torn, foreign or damaged file: recompute (and replace) rather than fail
            log.warning("ignoring unusable cached encoding %s: %s", path, str(error).splitlines()[0] if str(error) else error)
            return None

    def put(self, text: str, encoding: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(text)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            save_file({"encoding": encoding.detach().to("cpu").contiguous()}, str(tmp))
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        except OSError as error:  # the cache is an optimisation: a full disk must not stop the run
            tmp.unlink(missing_ok=True)
            log.warning("embedding cache: cannot write %s (%s)", path, error)
