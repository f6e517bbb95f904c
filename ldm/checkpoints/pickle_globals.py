"""The table of globals a checkpoint's pickle may name, and the inert stand-ins for the classes it may not run.

The unpickler (``ldm.checkpoints.unpickler``) resolves every global through :func:`find_global` and calls
only what :func:`is_data_constructor` accepts; dict keys and set elements pass :func:`check_key` first.

What the table hands out, and why each is harmless with arbitrary arguments: torch's tensor rebuild
functions for dense tensors and parameters, wrapped (hooks and Python attributes dropped, storages must
be real storages, ``Tensor.set_`` checks the bounds; the ``torch.Tensor`` class itself never, since
``Tensor.__new__(cdata=N)`` wraps a raw address); dtypes, ``torch.Size``, ``torch.device``,
``torch.<X>Storage`` (as torch's own ``StorageType``), ``OrderedDict``, ``set``, ``frozenset``,
``complex``, ``bytearray`` (from bytes only: ``bytearray(N)`` would allocate N bytes) and
``_codecs.encode`` limited to latin-1 (protocol 2 spells ``bytes`` that way), all behind argument
checks; anything under ``pytorch_lightning`` / ``lightning`` / ``lightning_fabric`` and numpy's scalar,
array and dtype reconstructors become inert stand-ins that keep their arguments and run nothing
(``numpy.ndarray(shape, dtype=object, buffer=...)`` builds object pointers from raw bytes). Everything
else raises :class:`RefusedGlobal` naming it. Loading never imports a module named by the file.
"""

from __future__ import annotations

import _compat_pickle
import types
from collections import OrderedDict
from typing import Any

import torch

from ldm.checkpoints.errors import PickleRefused, RefusedGlobal
from ldm.messages import escaped

__all__ = ["InertStandIn", "check_key", "find_global", "is_data_constructor", "is_stand_in_class", "ALLOWED_GLOBALS"]

_MAX_HASHED_INT = 2**61 - 2  # below sys.hash_info.modulus: distinct ints then have distinct hashes
_STAND_IN_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")


class InertStandIn:
    """Stand-in for a class a checkpoint names but whose code must not run (Lightning callbacks, numpy).

    Keeps constructor arguments, pickled state and items as plain data. Subclassed once per qualified
    name so that two different stand-ins used as dict keys stay distinct.
    """

    _original_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stand_in_args = args
        self._stand_in_kwargs = kwargs
        self._stand_in_items: list[Any] = []

    def __setstate__(self, state: Any) -> None:
        self._stand_in_state = state

    def _record(self, *item: Any) -> None:
        if "_stand_in_items" not in self.__dict__:  # made by NEWOBJ: __init__ did not run
            self._stand_in_items = []
        self._stand_in_items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass (Lightning's AttributeDict)
        self._record(key, value)

    def append(self, item: Any) -> None:  # a list subclass
        self._record(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self._record(item)

    def add(self, item: Any) -> None:  # a set subclass
        self._record(item)

    def __repr__(self) -> str:
        return f"<inert stand-in for {self._original_name}>"


def is_stand_in_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, InertStandIn)


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
        raise PickleRefused(f"tensor data is a {type(storage).__name__}, not a storage")


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_storage(storage)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_storage(storage)
    # Hooks are callables: never take them from a file (torch itself no longer saves them).
    metadata = metadata if type(metadata) is dict else None
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, bool(requires_grad), OrderedDict(), metadata
    )


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_storage(storage)
    if not isinstance(dtype, torch.dtype):
        raise PickleRefused("tensor dtype is not a torch.dtype")
    return torch._utils._rebuild_tensor_v3(
        storage, storage_offset, size, stride, bool(requires_grad), OrderedDict(), dtype,
        metadata if type(metadata) is dict else None,
    )


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # Also stands for _rebuild_parameter_with_state: Python attributes on a parameter are not weights.
    if not isinstance(data, torch.Tensor):
        raise PickleRefused("parameter data is not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type(_v2)`` for plain tensors and parameters only; attributes dropped."""
    # Identity checks: ``in`` would call ``==`` on objects from the file.
    known_func = any(func is rebuilder for rebuilder in _TENSOR_REBUILDERS)
    known_type = new_type is _TENSOR_TOKEN or new_type is _PARAMETER_TOKEN
    if not known_func or not known_type or type(args) is not tuple:
        raise PickleRefused("only plain tensors and parameters can be rebuilt")
    tensor = func(*args)
    if new_type is _PARAMETER_TOKEN and not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, tensor.requires_grad)
    return tensor


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol 2 uses it for ``bytes``: ``encode(str, "latin1")``, nothing else."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise PickleRefused("_codecs.encode is only allowed for latin-1 bytes")
    return text.encode("latin1")


def check_key(key: Any) -> None:
    """A dict key or set element must hash in constant time and never collide by construction."""
    kind = type(key)
    if kind in (str, bytes, bool, float) or key is None or isinstance(key, (InertStandIn, torch.dtype)):
        return
    if kind is int and -_MAX_HASHED_INT <= key <= _MAX_HASHED_INT:
        return
    if is_stand_in_class(key):
        return
    raise PickleRefused(f"a dict key or set element of type {escaped(kind.__name__)}")


def _items_of(iterable: Any) -> list:
    if type(iterable) not in (list, tuple, set, frozenset):
        raise PickleRefused("a constructor given something other than a list")
    return list(iterable)


def _ordered_dict(*args):
    if len(args) > 1:
        raise PickleRefused("OrderedDict given more than one argument")
    result = OrderedDict()
    for pair in _items_of(args[0]) if args else ():
        if type(pair) not in (tuple, list) or len(pair) != 2:
            raise PickleRefused("OrderedDict given something other than pairs")
        check_key(pair[0])
        result[pair[0]] = pair[1]
    return result


def _checked_set(kind: type):
    def build(*args):
        if len(args) > 1:
            raise PickleRefused(f"{kind.__name__} given more than one argument")
        items = _items_of(args[0]) if args else []
        for item in items:
            check_key(item)
        return kind(items)

    build.__name__ = kind.__name__
    return build


def _bytearray(*args):
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin-1")
    raise PickleRefused("bytearray is only allowed from bytes")  # bytearray(N) allocates N bytes


def _complex(real=0.0, imag=0.0):
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise PickleRefused("complex given something other than numbers")
    return complex(real, imag)


def _torch_size(dims=()):
    dims = _items_of(dims)
    if len(dims) > 64 or any(type(d) is not int or not 0 <= d < 2**62 for d in dims):
        raise PickleRefused("torch.Size given something other than sizes")
    return torch.Size(dims)


def _torch_device(*args):
    if not 1 <= len(args) <= 2 or any(type(a) not in (str, int) or (type(a) is str and len(a) > 64) for a in args):
        raise PickleRefused("torch.device given something other than a device name")
    return torch.device(*args)


def _build_allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": _ordered_dict,
        "builtins.set": _checked_set(set),
        "builtins.frozenset": _checked_set(frozenset),
        "builtins.complex": _complex,
        "builtins.bytearray": _bytearray,
        "_codecs.encode": _latin1_encode,
        "torch.Size": _torch_size,
        "torch.device": _torch_device,
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


ALLOWED_GLOBALS = _build_allowed_globals()
_CALLABLE_IDS = frozenset(id(value) for value in ALLOWED_GLOBALS.values() if isinstance(value, types.FunctionType))

# numpy's pickled names for scalars, arrays and dtypes (numpy 1 used numpy.core, numpy 2 numpy._core).
_NUMPY_DATA_GLOBALS = frozenset(
    f"{module}.{name}"
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("scalar", "_reconstruct")
) | {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray.ndarray", "numpy._core.multiarray.ndarray"}


# Textual-inversion files saved with torch 1.11-1.12 pickle their vectors inside a ParameterDict module;
# its state (``_parameters``) is plain data, its class is never needed.
_MODULE_CONTAINERS = frozenset({"torch.nn.modules.container.ParameterDict"})


def _is_stand_in(module: str, name: str) -> bool:
    if any(module == package or module.startswith(package + ".") for package in _STAND_IN_PACKAGES):
        return True
    qualified = f"{module}.{name}"
    return (
        qualified in _NUMPY_DATA_GLOBALS
        or qualified in _MODULE_CONTAINERS
        or (module == "numpy.dtypes" and name.endswith("DType"))
    )


def _shown_name(module: Any, name: Any) -> str:
    return escaped(f"{module}.{name}", 120)



def is_data_constructor(func: Any) -> bool:
    """What REDUCE / INST / OBJ may call: the table's functions (by identity), and stand-in classes."""
    return id(func) in _CALLABLE_IDS or is_stand_in_class(func)


def find_global(module: Any, name: Any, stand_ins: dict[str, type]) -> Any:
    """What the global ``module.name`` resolves to: the table's entry, or an inert stand-in class (one per
    qualified name, kept in ``stand_ins`` for the load); raises :class:`RefusedGlobal` for anything else."""
    if type(module) is not str or type(name) is not str:
        raise RefusedGlobal(_shown_name(module, name))
    # Protocol <= 2 writes Python 2 names (__builtin__.set); map them as pickle's own find_class does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module == "torch.tensor":  # renamed to torch._tensor (pytorch#51633); torch.load maps it too
        module = "torch._tensor"
    qualified = f"{module}.{name}"
    if qualified in ALLOWED_GLOBALS:
        return ALLOWED_GLOBALS[qualified]
    if _is_stand_in(module, name):
        stand_in = stand_ins.get(qualified)
        if stand_in is None:
            attributes = {"_original_name": _shown_name(module, name), "__module__": __name__}
            stand_in = stand_ins[qualified] = type("StandIn", (InertStandIn,), attributes)
        return stand_in
    raise RefusedGlobal(_shown_name(module, name))
