"""Read a Stable Diffusion checkpoint file into a flat ``{name: tensor}`` dict, without running its code.

Formats, told apart by their first bytes (the extension only has to agree for ``.safetensors``):

- safetensors: memory-mapped by ``safetensors.torch.load_file``, tensors as stored.
- PyTorch zip (``torch.save`` since 1.6; CompVis' ``sd-v1-*.ckpt``): the container is checked and its
  CRCs verified first (``ldm.checkpoints.zip_container``), then ``torch.load(mmap=True)``, so a 4 GB file is paged in on
  use instead of read into RAM; a re-zipped file with compressed records is read without mmap.
- PyTorch legacy pickle (``_use_new_zipfile_serialization=False``): cannot be mapped, read fully,
  through a file object without ``fileno`` so that torch never tries its tar reader on it.
- PyTorch's pre-1.0 tar format (recognised by a valid tar header checksum, never by trying to open it)
  and TorchScript archives are refused; a file that starts with zeros is a damaged or interrupted download.

Pickled formats go through ``ldm.checkpoints.unpickler`` (why it is safe, and why it is built the way it
is, is written there). Whatever goes wrong inside, the caller gets one :class:`CheckpointError` whose
message is one line and names the file; the tensors are then checked once (``ldm.checkpoints.weight_checks``)
before any model is built. Only regular files are opened (a FIFO or ``/dev/zero`` would block or
never end).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints.errors import CheckpointError, PickleRefused, RefusedGlobal, ZipRefused
from ldm.checkpoints.pickle_limits import PickleLimits
from ldm.checkpoints.unpickler import restricted_pickle_module
from ldm.checkpoints.weight_checks import check_weights
from ldm.checkpoints.zip_container import inspect_torch_zip, verify_crcs
from ldm.messages import describe_error, escaped
from ldm.regular_files import require_regular_mode

log = logging.getLogger(__name__)

__all__ = ["read_checkpoint", "read_torch_data"]

SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training code nests the weights: CompVis/Lightning use "state_dict"; other trainers
# wrap it in "model" / "module" / "model_state_dict". Tried in this order, at most this deep.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_MAX_WRAPPER_DEPTH = 4
_SNIFF_BYTES = 4096
_TAR_BLOCK = 512


class _NoFileno(io.BufferedReader):
    """A file torch must read through Python: without ``fileno`` its legacy loader skips ``tarfile``."""

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike[str], unread_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Return the flat ``{name: tensor}`` weights of a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` file.

    Tensors keep their stored dtype and live on the CPU (memory-mapped where the format allows).
    For pickled checkpoints the weights are the first mapping, from the top down, that holds tensors
    (0-d counters like ``step`` do not count):
    the top-level dict itself, else its ``state_dict`` (or ``model``, ...) entry, at most four levels
    deep; so outer tensors win over a nested ``state_dict``, as in the webui and ComfyUI. Entries that
    are not tensors are dropped. Raises :class:`CheckpointError` (one line) for anything that is
    missing, unreadable, damaged, holds no tensors, holds unusable tensors or would need to run code.
    ``unread_prefixes``: keys whose values the caller will not use, not scanned for NaN (:func:`check_weights`).
    """
    shown = escaped(os.fspath(path), 300)

    def read_and_check() -> dict[str, torch.Tensor]:
        weights = _read(Path(path), shown)
        check_weights(weights, shown, unread_prefixes)
        return weights

    return _one_error(read_and_check, shown)


def read_torch_data(path: str | os.PathLike[str]) -> Any:
    """The whole content of a small PyTorch ``.pt`` / ``.bin`` file, read by the same restricted unpickler.

    For files whose tensors are not a flat state dict, such as textual-inversion embeddings
    (``{"string_to_param": {"*": tensor}, "name": ..., "step": ...}``): nested dicts, strings and numbers
    come back as they are; classes outside the allowlist are refused as in :func:`read_checkpoint`
    (a ``torch.nn.ParameterDict`` becomes an inert stand-in whose pickled state is ``_stand_in_state``).
    The tensors are not checked: the caller knows which of them it uses.
    """
    shown = escaped(os.fspath(path), 300)

    def read() -> Any:
        file = Path(path)
        kind, size = _checked_kind(file, shown)
        if kind not in ("zip", "pickle"):
            raise CheckpointError(f"cannot read {shown}: not a PyTorch .pt/.bin file (found {kind} data)")
        return _read_torch_pickle(file, shown, size, zip_format=kind == "zip")

    return _one_error(read, shown)


def _one_error(read, shown: str) -> Any:
    """``read()``, with whatever goes wrong inside turned into one :class:`CheckpointError`."""
    try:
        return read()
    except CheckpointError:
        raise
    except (RefusedGlobal, PickleRefused, ZipRefused) as error:
        raise CheckpointError(_refusal_message(error, shown)) from None
    except RecursionError:
        raise CheckpointError(f"cannot read {shown}: its data nests too deeply") from None
    except MemoryError:
        raise CheckpointError(f"cannot read {shown}: not enough memory to read it") from None
    except Exception as error:
        refused = _refusal_in(error)
        if refused is not None:
            raise CheckpointError(_refusal_message(refused, shown)) from None
        log.debug("reading %s failed", shown, exc_info=True)
        raise CheckpointError(f"cannot read {shown}: the file is damaged or truncated ({describe_error(error)})") from None


def _refusal_message(error: BaseException, shown: str) -> str:
    if isinstance(error, RefusedGlobal):
        return f"refusing to load {shown}: it references {error.qualified_name}, which could run code; only tensors are allowed"
    if isinstance(error, ZipRefused):
        return f"cannot read {shown}: {error}"
    return f"refusing to load {shown}: {error}"


def _refusal_in(error: BaseException) -> BaseException | None:
    """A refusal that ``error`` was raised while handling or because of (torch re-raises some errors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (PickleRefused, ZipRefused)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _checked_kind(file: Path, shown: str) -> tuple[str, int]:
    """(format, size) of a regular file, from its first bytes (see :func:`_sniff_format`)."""
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {shown}") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {shown}: {describe_error(error)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"cannot read {shown}: it is a directory, not a checkpoint file")
    _require_regular(info.st_mode, shown)
    return _sniff_format(_read_head(file, shown), info.st_size), info.st_size


def _require_regular(mode: int, shown: str) -> None:
    require_regular_mode(mode, CheckpointError, f"cannot read {shown}: not a regular file (a pipe, socket or device)")


def _read(file: Path, shown: str) -> dict[str, torch.Tensor]:
    kind, size = _checked_kind(file, shown)

    if file.suffix.lower() == SAFETENSORS_SUFFIX and kind not in ("safetensors", "empty", "zeros"):
        looks_like = {"zip": "a PyTorch zip checkpoint", "pickle": "a PyTorch pickle"}.get(kind, "unrecognised data")
        raise CheckpointError(f"cannot read {shown}: it is named .safetensors but holds {looks_like}")
    messages = {
        "empty": "the file is empty",
        "zeros": "it starts with zeros: a damaged or interrupted download",
        "tar": "it uses PyTorch's pre-1.0 tar format; re-save it with a current torch",
        "unknown": "not a checkpoint this program knows (expected safetensors or a PyTorch .ckpt/.pt/.pth), or the file is damaged",
    }
    if kind in messages:
        raise CheckpointError(f"cannot read {shown}: {messages[kind]}")
    if kind == "safetensors":
        weights = _read_safetensors(file, shown)
    else:
        weights = _tensors_only(_read_torch_pickle(file, shown, size, zip_format=kind == "zip"), shown)
    if not weights:
        raise CheckpointError(f"cannot use {shown}: it contains no tensors")
    log.debug("read %d tensors from %s (%s)", len(weights), shown, kind)
    return weights


def _read_head(file: Path, shown: str) -> bytes:
    """The first bytes, opened non-blocking and re-checked as a regular file (it may have been swapped)."""
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _require_regular(os.fstat(fd).st_mode, shown)
        return os.read(fd, _SNIFF_BYTES)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------


def _is_tar_header(block: bytes) -> bool:
    """tarfile's own test, on the header alone: the checksum field matches the block's byte sum."""
    if len(block) < _TAR_BLOCK:
        return False
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    unsigned = 256 + sum(block[:148]) + sum(block[156:_TAR_BLOCK])
    signed = 256 + sum(struct.unpack("148b", block[:148])) + sum(struct.unpack("356b", block[156:_TAR_BLOCK]))
    return stored in (unsigned, signed)


def _sniff_format(head: bytes, size: int) -> str:
    """One of ``safetensors``, ``zip``, ``pickle``, ``tar``, ``empty``, ``zeros``, ``unknown``."""
    if not head:
        return "empty"
    if head.count(0) == len(head):  # a preallocated file the download never filled
        return "zeros"
    # safetensors: little-endian u64 header length, then the JSON header itself.
    # (A header longer than the file is still safetensors, damaged: the library says so.)
    if len(head) >= 10 and head[8:10] in (b'{"', b"{}") and struct.unpack("<Q", head[:8])[0] >= 2:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):  # the same test torch.serialization._is_zipfile makes
        return "zip"
    # Before the pickle test: a pickle whose first 512 bytes also form a valid tar header would
    # otherwise reach torch's tar reader, which extracts entries (links to FIFOs, /proc/self/fd/0...).
    if _is_tar_header(head[:_TAR_BLOCK]):
        return "tar"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    return "unknown"


def _read_safetensors(file: Path, shown: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")  # mmap backend by default
    except Exception as error:  # SafetensorError, OSError, JSON/offset errors
        raise CheckpointError(f"cannot read {shown}: damaged safetensors file ({describe_error(error)})") from None


def _read_torch_pickle(file: Path, shown: str, size: int, zip_format: bool) -> Any:
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        # torch would then refuse any pickle_module, even a stricter one than its own.
        raise CheckpointError(
            f"cannot read {shown}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which rejects this loader's "
            "restricted unpickler; unset it or convert the file to .safetensors"
        )
    if not zip_format:
        log.info("%s is a legacy (non-zip) PyTorch file: reading it fully into memory", shown)
        with _NoFileno(io.FileIO(file, "rb")) as handle:
            return _torch_load(handle, PickleLimits(file_bytes=size), mmap=False)
    layout = inspect_torch_zip(file, size)
    _refuse_torchscript(layout, shown)
    verify_crcs(file, layout)
    if layout.compressed:
        log.info("%s has compressed records: reading it fully into memory", shown)
    return _torch_load(file, PickleLimits(record_sizes=layout.storage_sizes), mmap=not layout.compressed)


def _torch_load(source: Any, limits: PickleLimits, mmap: bool) -> Any:
    return torch.load(
        source,
        map_location="cpu",
        pickle_module=restricted_pickle_module(limits),
        weights_only=False,  # our pickle_module is the restriction; see ldm.checkpoints.unpickler
        mmap=mmap,
    )


def _refuse_torchscript(layout, shown: str) -> None:
    """torch.load hands a zip holding ``constants.pkl`` to ``torch.jit.load``: compiled code, not data."""
    if any(info.filename.endswith("/constants.pkl") for info in layout.infos):
        raise CheckpointError(f"refusing to load {shown}: it is a TorchScript archive (compiled code), not a checkpoint")


# ---------------------------------------------------------------------------------------------------
# The state dict inside an unpickled checkpoint
# ---------------------------------------------------------------------------------------------------


def _tensors_only(obj: Any, shown: str) -> dict[str, torch.Tensor]:
    """The flat {str: Tensor} part of an unpickled checkpoint (see :func:`read_checkpoint`).

    Mappings are read through ``dict``'s own methods: nothing the file set on an instance is called.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot use {shown}: it holds a {escaped(type(obj).__name__)}, not a dict of tensors")
    state = _find_state_dict(obj, depth=0)
    if state is None:
        return {}
    weights: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, value in dict.items(state):
        if type(key) is str and isinstance(value, torch.Tensor):
            # detach(): a plain tensor sharing the storage, without the hooks or Python state a file may set.
            weights[key] = value.detach()
        else:
            dropped += 1
    if dropped:
        log.debug("%s: dropped %d non-tensor entries of the state dict", shown, dropped)
    return weights


def _find_state_dict(obj: dict, depth: int) -> dict | None:
    """The first mapping from the top down that holds weights (a tensor of at least one dimension; 0-d
    tensors next to a wrapper are counters like ``step``): outer tensors win over a nested copy."""
    if any(isinstance(value, torch.Tensor) and value.dim() > 0 for value in dict.values(obj)):
        return obj
    if depth < _MAX_WRAPPER_DEPTH:
        for key in _WRAPPER_KEYS:
            inner = dict.get(obj, key)
            if isinstance(inner, dict):
                found = _find_state_dict(inner, depth + 1)
                if found is not None:
                    return found
    return None
