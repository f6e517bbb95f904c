"""Read a Stable Diffusion checkpoint file into a flat ``{name: tensor}`` dict, without running its code.

Formats, told apart by their content (the extension only has to agree for ``.safetensors``):

- safetensors: memory-mapped by ``safetensors.torch.load_file`` (its default ``mmap`` backend), tensors
  as stored.
- PyTorch zip (``torch.save`` since 1.6; CompVis' ``sd-v1-*.ckpt``): ``torch.load(mmap=True)``, so a 4 GB
  file is paged in on use instead of read into RAM.
- PyTorch legacy pickle (``_use_new_zipfile_serialization=False``): cannot be mapped, read fully.
- PyTorch's pre-1.0 tar format and TorchScript archives are refused.

A ``.ckpt`` is a pickle, and unpickling calls whatever functions the file names: ``os.system`` as
easily as ``torch._utils._rebuild_tensor_v2``. We pass ``torch.load`` a ``pickle_module`` whose
``Unpickler.find_class`` (the only way a pickle can obtain a function or class to call: GLOBAL,
STACK_GLOBAL, INST and EXT* all go through it) answers from a fixed table and raises for any other
name; the module-level ``load`` of that module uses the same unpickler, because torch's legacy reader
calls ``pickle_module.load`` directly for the file's header records. Both of torch's readers subclass
``pickle_module.Unpickler`` and end in ``super().find_class``; their only own answer is a
``StorageType`` (a dtype holder) for names containing "Storage" (torch/serialization.py, 2.13), so
``_ALLOWED_GLOBALS`` plus the stand-in rules really are all a file can reach
(``tests/test_checkpoint_file.py`` proves it with ``os.system`` / ``exec`` payloads and a marker file).

Why not ``weights_only=True`` plus ``torch.serialization.safe_globals``? Real SD v1 files pickle
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (and sometimes numpy scalars under
``callbacks``). ``safe_globals`` can only admit names known in advance and hands out the real
objects; here *any* name under the Lightning packages must become an inert stand-in, and the
numpy names must not reach numpy at all: ``numpy.ndarray(shape, dtype=object, buffer=...)`` builds
object pointers from raw bytes, so admitting ``numpy.ndarray`` as torch users are told to do
(``add_safe_globals([np.ndarray, ...])``) turns a file into a memory-corruption primitive. A table we
own also gives one-line messages that name the refused global.

What the table hands out, and why each is harmless when called with arbitrary arguments (pickle's
REDUCE calls it with positional arguments; NEWOBJ / NEWOBJ_EX call ``cls.__new__(cls, *args,
**kwargs)`` on classes):

- torch's tensor rebuild functions for dense tensors and parameters, wrapped: backward hooks and
  Python attributes from the file are dropped (weights need neither), storages must be real storages
  (``Tensor.set_`` checks the bounds). ``_rebuild_from_type_v2`` only rebuilds plain tensors and
  parameters. The ``torch.Tensor`` class itself is never handed out:
  ``torch.Tensor.__new__(torch.Tensor, cdata=N)`` wraps an arbitrary address (it segfaults here), and
  NEWOBJ_EX can pass that keyword. Sparse, quantized, nested and wrapper-subclass rebuilds are refused.
- dtypes (``torch.float16``...), ``torch.Size``, ``torch.device``, ``torch.<X>Storage`` (as torch's own
  ``StorageType``), ``collections.OrderedDict``, ``set``/``frozenset``/``complex``/``bytearray`` and
  ``_codecs.encode`` limited to latin-1 (protocol 2 spells ``bytes`` that way). The storage classes
  ``torch.storage.TypedStorage`` / ``UntypedStorage`` are not: torch writes storages as persistent ids
  that its own ``persistent_load`` turns into storages, never as calls.
- anything under ``pytorch_lightning`` / ``lightning`` / ``lightning_fabric``, and the numpy scalar,
  array and dtype reconstructors: inert stand-in classes that keep their arguments and state and run
  nothing. They only ever sit in entries that are dropped (callbacks, hyper-parameters).

Everything else (``posix.system``, ``builtins.exec``, ``builtins.getattr``, ``functools.partial``,
``torch.storage._load_from_bytes`` which would call an unrestricted ``torch.load``, ...) raises
:class:`CheckpointError` naming it. Loading never imports a module named by the file.
"""

from __future__ import annotations

import _compat_pickle
import io
import logging
import os
import pickle
import struct
import tarfile
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_checkpoint"]

SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training code nests the weights: CompVis/Lightning use "state_dict"; other trainers
# wrap it in "model" / "module" / "model_state_dict". Tried in this order, at most this deep.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_MAX_WRAPPER_DEPTH = 4
# Namespaces whose classes are replaced by inert stand-ins (Lightning's callbacks and loops).
_STAND_IN_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")
_MAX_SHOWN_NAME = 120


class CheckpointError(UserError):
    """A checkpoint that cannot (or must not) be read; the message is one line and names the file."""


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Return the flat ``{name: tensor}`` weights of a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` file.

    Tensors keep their stored dtype and live on the CPU (memory-mapped where the format allows).
    For pickled checkpoints the state dict is found under ``state_dict`` (possibly nested, e.g.
    ``{"model": {"state_dict": ...}}``) or is the top-level dict itself; entries that are not tensors
    (step counters, strings, nested dicts) are dropped. Raises :class:`CheckpointError` for anything
    that is missing, unreadable, damaged, holds no tensors or would need to run code.
    """
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(path))
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint not found: {shown}")
    if file.is_dir():
        raise CheckpointError(f"cannot read {shown}: it is a directory, not a checkpoint file")
    try:
        kind = _sniff_format(file)
    except OSError as error:
        raise CheckpointError(f"cannot read {shown}: {_one_line(error)}") from error

    if file.suffix.lower() == SAFETENSORS_SUFFIX and kind not in ("safetensors", "empty"):
        looks_like = {"zip": "a PyTorch zip checkpoint", "pickle": "a PyTorch pickle"}.get(kind, "unrecognised data")
        raise CheckpointError(f"cannot read {shown}: it is named .safetensors but holds {looks_like}")
    if kind == "empty":
        raise CheckpointError(f"cannot read {shown}: the file is empty")
    if kind == "tar":
        raise CheckpointError(
            f"cannot read {shown}: it uses PyTorch's pre-1.0 tar format; re-save it with a current torch"
        )
    if kind == "unknown":
        raise CheckpointError(
            f"cannot read {shown}: not a checkpoint this program knows "
            "(expected safetensors or a PyTorch .ckpt/.pt/.pth), or the file is damaged"
        )

    if kind == "safetensors":
        weights = _read_safetensors(file, shown)
    else:
        weights = _tensors_only(_read_torch_pickle(file, shown, zip_format=kind == "zip"), shown)
    if not weights:
        raise CheckpointError(f"cannot use {shown}: it contains no tensors")
    log.debug("read %d tensors from %s (%s)", len(weights), shown, kind)
    return weights


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------


def _sniff_format(file: Path) -> str:
    """One of ``safetensors``, ``zip``, ``pickle``, ``tar``, ``empty``, ``unknown``, from the first bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(16)
    if not head:
        return "empty"
    # safetensors: little-endian u64 header length, then the JSON header itself.
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):  # the same test torch.serialization._is_zipfile makes
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    if tarfile.is_tarfile(file):
        return "tar"
    return "unknown"


def _read_safetensors(file: Path, shown: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")  # mmap backend by default
    except Exception as error:  # SafetensorError, OSError, JSON/offset errors
        raise CheckpointError(f"cannot read {shown}: damaged safetensors file ({_one_line(error)})") from error


def _read_torch_pickle(file: Path, shown: str, zip_format: bool) -> Any:
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        # torch would then refuse any pickle_module, even a stricter one than its own.
        raise CheckpointError(
            f"cannot read {shown}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which rejects this loader's "
            "restricted unpickler; unset it or convert the file to .safetensors"
        )
    try:
        if zip_format:
            _refuse_torchscript(file, shown)
        else:
            log.info("%s is a legacy (non-zip) PyTorch file: reading it fully into memory", shown)
        return torch.load(
            file,
            map_location="cpu",
            pickle_module=_RESTRICTED_PICKLE,
            weights_only=False,  # our pickle_module is the restriction; see the module docstring
            mmap=zip_format,
        )
    except CheckpointError:
        raise
    except Exception as error:
        refused = _refused_global_in(error)
        if refused is not None:
            raise CheckpointError(
                f"refusing to load {shown}: it references {refused}, which could run code; only tensors are allowed"
            ) from None
        log.debug("torch.load(%s) failed", shown, exc_info=True)
        detail = _one_line(error)
        raise CheckpointError(f"cannot read {shown}: the file is damaged or truncated ({detail})") from error


def _refuse_torchscript(file: Path, shown: str) -> None:
    """torch.load hands a zip holding ``constants.pkl`` to ``torch.jit.load``: compiled code, not data."""
    reader = torch._C.PyTorchFileReader(str(file))  # the reader torch.load itself uses
    if "constants.pkl" in reader.get_all_records():
        raise CheckpointError(
            f"refusing to load {shown}: it is a TorchScript archive (compiled code), not a checkpoint"
        )


def _tensors_only(obj: Any, shown: str) -> dict[str, torch.Tensor]:
    """The flat {str: Tensor} part of an unpickled checkpoint (see :func:`read_checkpoint`)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"cannot use {shown}: it holds a {type(obj).__name__}, not a dict of tensors")
    state = _find_state_dict(obj, depth=0)
    if state is None:
        return {}
    weights: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            # detach(): a plain tensor sharing the storage, without the hooks or Python state a file may set.
            weights[key] = value.detach()
        else:
            dropped += 1
    if dropped:
        log.debug("%s: dropped %d non-tensor entries of the state dict", shown, dropped)
    return weights


def _find_state_dict(obj: Mapping, depth: int) -> Mapping | None:
    if depth < _MAX_WRAPPER_DEPTH:
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found = _find_state_dict(inner, depth + 1)
                if found is not None:
                    return found
    if any(isinstance(value, torch.Tensor) for value in obj.values()):
        return obj
    return None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    detail = text[0].strip() if text else ""
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------------


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, qualified_name: str) -> None:
        super().__init__(f"refused global {qualified_name}")
        self.qualified_name = qualified_name


def _refused_global_in(error: BaseException) -> str | None:
    """The refused name if ``error`` is (or was raised while handling / because of) a refusal."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, _RefusedGlobal):
            return current.qualified_name
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class _InertStandIn:
    """Stand-in for a class a checkpoint names but whose code must not run (Lightning callbacks, numpy).

    Accepts any constructor arguments and any pickled state and keeps them as plain data. Subclassed
    once per qualified name so that two different stand-ins used as dict keys stay distinct.
    """

    _original_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stand_in_args = args
        self._stand_in_kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self._stand_in_state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self._original_name}>"


class _TypeToken:
    """What ``torch.Tensor`` / ``torch.nn.Parameter`` resolve to: a name for the rebuild wrappers, not a class."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_TENSOR_TOKEN = _TypeToken("torch.Tensor")
_PARAMETER_TOKEN = _TypeToken("torch.nn.Parameter")


def _check_storage(storage: Any) -> None:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"tensor data is a {type(storage).__name__}, not a storage")


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_storage(storage)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_storage(storage)
    # Hooks are callables: never take them from a file (torch itself no longer saves them).
    metadata = metadata if isinstance(metadata, dict) else None
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, bool(requires_grad), OrderedDict(), metadata
    )


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_storage(storage)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("tensor dtype is not a torch.dtype")
    return torch._utils._rebuild_tensor_v3(
        storage, storage_offset, size, stride, bool(requires_grad), OrderedDict(), dtype,
        metadata if isinstance(metadata, dict) else None,
    )


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # Also stands for _rebuild_parameter_with_state: Python attributes on a parameter are not weights.
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type(_v2)`` for plain tensors and parameters only; attributes dropped."""
    # Identity checks: ``in`` would call ``==`` on objects from the file.
    known_func = any(func is rebuilder for rebuilder in _TENSOR_REBUILDERS)
    known_type = new_type is _TENSOR_TOKEN or new_type is _PARAMETER_TOKEN
    if not known_func or not known_type or not isinstance(args, tuple):
        raise pickle.UnpicklingError("only plain tensors and parameters can be rebuilt")
    tensor = func(*args)
    if new_type is _PARAMETER_TOKEN and not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, tensor.requires_grad)
    return tensor


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol 2 uses it for ``bytes``: ``encode(str, "latin1")``, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 bytes")
    return text.encode("latin1")


def _build_allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "_codecs.encode": _latin1_encode,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": _TENSOR_TOKEN,
        "torch.nn.parameter.Parameter": _PARAMETER_TOKEN,
        "torch.nn.Parameter": _PARAMETER_TOKEN,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type": _rebuild_from_type,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    }
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[str(value)] = value  # str(torch.float16) == "torch.float16", the pickled name
    for name, value in vars(torch).items():
        if name.endswith("Storage") and isinstance(value, type) and name not in ("TypedStorage", "UntypedStorage"):
            try:
                allowed[f"torch.{name}"] = torch.serialization.StorageType(name)
            except KeyError:  # a storage class without a dtype of its own
                pass
    return allowed


_ALLOWED_GLOBALS = _build_allowed_globals()

# numpy's pickled names for scalars, arrays and dtypes (numpy 1 used numpy.core, numpy 2 numpy._core):
# only ever stand-ins, see the module docstring.
_NUMPY_DATA_GLOBALS = frozenset(
    f"{module}.{name}"
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("scalar", "_reconstruct")
) | {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray.ndarray", "numpy._core.multiarray.ndarray"}


def _is_stand_in(module: str, name: str) -> bool:
    if any(module == package or module.startswith(package + ".") for package in _STAND_IN_PACKAGES):
        return True
    qualified = f"{module}.{name}"
    return qualified in _NUMPY_DATA_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType"))


def _shown_name(module: Any, name: Any) -> str:
    text = f"{module}.{name}".encode("unicode_escape").decode("ascii")  # keep the message on one line
    return text if len(text) <= _MAX_SHOWN_NAME else text[: _MAX_SHOWN_NAME - 3] + "..."


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` answers only from the allowlist and the stand-in rules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        if not isinstance(module, str) or not isinstance(name, str):
            raise _RefusedGlobal(_shown_name(module, name))
        # Protocol <= 2 writes Python 2 names (__builtin__.set); map them as pickle's own find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.tensor":  # renamed to torch._tensor (pytorch#51633); torch.load maps it too
            module = "torch._tensor"
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[qualified]
        if _is_stand_in(module, name):
            stand_in = self._stand_ins.get(qualified)
            if stand_in is None:
                stand_in = type(
                    "StandIn", (_InertStandIn,), {"_original_name": _shown_name(module, name), "__module__": __name__}
                )
                self._stand_ins[qualified] = stand_in
            return stand_in
        raise _RefusedGlobal(_shown_name(module, name))


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# What torch.load receives as ``pickle_module``: it uses ``.Unpickler`` (subclassed) and ``.load``.
_RESTRICTED_PICKLE = types.ModuleType("ldm_restricted_pickle", "pickle with an allowlisted find_class")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = _restricted_load
_RESTRICTED_PICKLE.loads = _restricted_loads
_RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError
