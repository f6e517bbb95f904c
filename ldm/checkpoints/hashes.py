"""The hashes that name weight files, each computed here once: the webui's model, LoRA and embedding hashes
(AUTOMATIC1111's ``modules/hashes.py`` and ``extensions-builtin/Lora/network.py``) and the cheap fingerprint
that keys cached text encodings."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Mapping

import torch

BLOCK = 1 << 20
SAMPLE_ELEMENTS = 1024  # of each tensor's start and end: a fine-tune or a merge changes nearly every tensor it touches


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """sha256 of a file's bytes from offset ``start`` to the end, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """A1111's ``shorthash`` of a checkpoint (AutoV2): the first 10 hex digits of the whole file's sha256."""
    return file_sha256_once(path)[:10]


def file_sha256_once(path: str | os.PathLike) -> str:
    """:func:`file_sha256` of a whole file, read once per file version (path, size, modification time), so that
    a server's requests do not hash gigabytes each."""
    stat = os.stat(path)
    return _sha256_of_version(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def safetensors_data_sha256(path: str | os.PathLike) -> str:
    """kohya's / additional-networks' hash of a ``.safetensors`` file: the sha256 of everything after the JSON
    header (the tensor data), so that editing the metadata keeps the hash."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
    return file_sha256(path, start=8 + header_length)


def checkpoint_fingerprint(path: str | os.PathLike, chunk: int = BLOCK) -> str:
    """A cheap identity for a checkpoint file: sha256 of its size, first MB and last MB.

    Good enough to key cached text encodings (a different checkpoint of the same size differs in its first
    or last megabyte in practice), and costs two reads instead of hashing gigabytes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def sampled_fingerprint(tensors: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = ("",)) -> str:
    """sha256 of the tensors whose names start with ``prefixes``: each one's name, shape, dtype and first and last
    :data:`SAMPLE_ELEMENTS` values (as float32). It keys converted models by the weights they are made of; a file's
    :func:`checkpoint_fingerprint` cannot, since the start and the end of a checkpoint hold neither its VAE nor most
    of its UNet (two files that differ there share it). Reads two pages a tensor of a memory-mapped file."""
    digest = hashlib.sha256()
    for name in sorted(key for key in tensors if key.startswith(prefixes)):
        tensor = tensors[name]
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        for part in (flat[:SAMPLE_ELEMENTS], flat[-SAMPLE_ELEMENTS:]):
            digest.update(part.float().contiguous().numpy().tobytes())
    return digest.hexdigest()
