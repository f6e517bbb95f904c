"""The unpickler behind ``ldm.checkpoints.reader``: builds tensors and plain data, never runs a file's code.

A ``.ckpt`` is a pickle, and unpickling calls whatever functions the file names: ``os.system`` as
easily as ``torch._utils._rebuild_tensor_v2``. ``torch.load`` is given a ``pickle_module`` (made by
:func:`restricted_pickle_module`) whose ``Unpickler.find_class`` answers from a fixed table and raises
for any other name. torch's two readers subclass that ``Unpickler`` and end in ``super().find_class``;
their only own answer is a ``StorageType`` (a dtype holder) for names containing "Storage"
(torch/serialization.py, 2.13).

Names alone are not enough: a pickle with no global at all can still crash or exhaust the process
(a tuple nested a million deep used as a dict key overflows the C stack when hashed; 200,000 integer
keys with equal hashes take hours; ``LONG_BINPUT 0xffffffff`` makes the C unpickler allocate a
4-billion-slot memo; a 20-byte opcode declares a 1 TB string). So this is the reference *pure-Python*
unpickler (``pickle._Unpickler``), which interprets one opcode at a time, with every opcode that
allocates, hashes, calls or mutates checked before it runs:

- every opcode is charged against one memory budget per load (:data:`MAX_PICKLE_MEMORY`, shared by
  the five pickles of torch's legacy format), bytes read included; a read or line longer than what is
  left of the file is refused before the buffer is allocated;
- dict keys and set elements must be ``str``/``bytes``/``int`` (below the hash modulus, so no two
  collide)/``float``/``bool``/``None`` or an inert stand-in: nothing built from the file is ever hashed
  recursively, and nesting depth is bounded (:data:`MAX_DEPTH`);
- REDUCE/INST/OBJ may call only the table's own functions, NEWOBJ only stand-in classes, BUILD only
  sets a stand-in's state (a dict's pickled attributes, like ``state_dict()._metadata``, are dropped,
  so an ``OrderedDict`` cannot carry an attribute named ``get``), APPEND/SETITEM/ADDITEMS only grow
  lists, dicts and sets (or stand-ins);
- the storages a file declares must fit in it (legacy format) or in their zip record, before torch
  allocates them; extension codes, text persistent ids and out-of-band buffers are refused.

Why this rather than a ``pickletools`` pre-scan or a child process? A pre-scan is a second pickle
interpreter: wherever it disagrees with the one that then really loads the file (memo, frames, MARK
bookkeeping), a crafted file passes the scan and does something else at load. A child process with a
memory limit and a timeout survives anything, but must unpickle twice (the tensors are views into a
file mapping that only the loading process holds), needs ``fork`` after torch started its threads or a
second ``import torch`` (~2 s), and RLIMIT_AS counts the 4 GB mapping. Checking each opcode in the one
interpreter that builds the result has neither problem; for an SD v1 file it costs well under a second.

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
import io
import pickle
import types
from collections import OrderedDict
from typing import Any

import torch

from ldm.messages import escaped

__all__ = ["PickleLimits", "PickleRefused", "RefusedGlobal", "InertStandIn", "restricted_pickle_module"]

MAX_PICKLE_MEMORY = 256 * 2**20  # estimated bytes of Python objects one checkpoint's pickles may build
MAX_DEPTH = 64  # containers inside containers; SD v1 files nest fewer than 10 deep
MAX_LINE = 64 * 2**10  # protocol-0 text opcodes (GLOBAL's module and name, INT, ...)
_SMALL_READ = 4096  # reads up to this size are opcode arguments, charged with their opcode
_MAX_HASHED_INT = 2**61 - 2  # below sys.hash_info.modulus: distinct ints then have distinct hashes
_OPCODE_COST = 64  # bytes: a stack slot plus a small object
_CONTAINER_COST = 256  # an empty dict / set / list with its first slots
_ITEM_COST = 96  # one more dict or set entry
_STAND_IN_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")


class PickleRefused(pickle.UnpicklingError):
    """The pickle does something a checkpoint never needs (the message says what); nothing of it ran."""


class RefusedGlobal(PickleRefused):
    """The pickle names a function or class outside the table."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(f"refused global {qualified_name}")
        self.qualified_name = qualified_name


class PickleLimits:
    """Budgets shared by every unpickler of one ``torch.load`` (the legacy format runs five pickles).

    ``record_sizes``: zip format, ``{storage key: bytes in data/<key>}``. ``file_bytes``: legacy format,
    how many bytes the file has for storages (they follow the pickles).
    """

    def __init__(self, record_sizes: dict[str, int] | None = None, file_bytes: int = 0) -> None:
        self.memory_left = MAX_PICKLE_MEMORY
        self.record_sizes = record_sizes
        self.storage_bytes_left = file_bytes
        self.storage_roots: set[str] = set()

    def charge(self, nbytes: int) -> None:
        self.memory_left -= nbytes
        if self.memory_left < 0:
            raise PickleRefused(f"its pickle builds more than {MAX_PICKLE_MEMORY // 2**20} MiB of objects")

    def check_storage(self, pid: Any) -> None:
        """Refuse a persistent id that is not a storage the file really holds, before torch allocates it."""
        zip_format = self.record_sizes is not None
        if type(pid) is not tuple or len(pid) != (5 if zip_format else 6) or pid[0] != "storage":
            raise PickleRefused("it references data that is not a tensor storage")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, torch.serialization.StorageType):
            raise PickleRefused("a tensor storage without a dtype")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise PickleRefused("a malformed tensor storage reference")
        nbytes = numel * torch._utils._element_size(storage_type.dtype)
        if zip_format:
            if nbytes > self.record_sizes.get(key, -1):
                raise pickle.UnpicklingError(f"tensor data record {escaped(key)} is missing or smaller than declared")
            return
        view = pid[5]
        if view is not None:
            if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str:
                raise PickleRefused("a malformed tensor storage view")
            offset, size = view[1], view[2]
            if type(offset) is not int or type(size) is not int or offset < 0 or size < 0 or offset + size > numel:
                raise PickleRefused("a tensor storage view outside its storage")
        if key not in self.storage_roots:
            self.storage_roots.add(key)
            self.storage_bytes_left -= nbytes
            if self.storage_bytes_left < 0:
                raise pickle.UnpicklingError("it declares more tensor data than the file holds")


class _BoundedReader:
    """The unpickler's view of the file: no read longer than what is left, no unbounded line."""

    def __init__(self, file: Any, limits: PickleLimits) -> None:
        self._file = file
        self._limits = limits
        position = file.tell()
        self._end = file.seek(0, io.SEEK_END)
        file.seek(position)

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= _SMALL_READ:  # opcode arguments: a short read just ends the pickle early
            return self._file.read(size)
        if size < 0 or size > self._end - self._file.tell():
            raise pickle.UnpicklingError("the pickle declares more data than the file holds")
        self._limits.charge(size)
        return self._file.read(size)

    def readline(self) -> bytes:
        line = self._file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise PickleRefused(f"a pickle text line longer than {MAX_LINE} bytes")
        self._limits.charge(len(line))
        return line


# ---------------------------------------------------------------------------------------------------
# Stand-ins and the table of globals
# ---------------------------------------------------------------------------------------------------


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


def _is_stand_in_class(obj: Any) -> bool:
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
    if _is_stand_in_class(key):
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
# What REDUCE / INST / OBJ may call: the table's functions (by identity), and stand-in classes.
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


# ---------------------------------------------------------------------------------------------------
# The unpickler: pickle's reference interpreter with the dangerous opcodes checked
# ---------------------------------------------------------------------------------------------------


class _Dispatch(dict):
    def __missing__(self, opcode: int):
        raise pickle.UnpicklingError(f"invalid pickle opcode {opcode:#04x}")


class _RestrictedUnpickler(pickle._Unpickler):
    """See the module docstring. ``_limits`` is set on the per-load subclass."""

    _limits: PickleLimits

    def __init__(self, file: Any, **kwargs: Any) -> None:
        kwargs.pop("buffers", None)  # out-of-band buffers are refused anyway
        super().__init__(_BoundedReader(file, self._limits), **kwargs)
        self._stand_ins: dict[str, type] = {}
        self._depths: dict[int, tuple[int, Any]] = {}  # id -> (depth, the object, kept alive)

    # torch assigns ``unpickler.persistent_load = its_loader``; keep ours in front of it.
    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, "_torch_persistent_load" if name == "persistent_load" else name, value)

    def persistent_load(self, pid: Any) -> Any:
        loader = self.__dict__.get("_torch_persistent_load")
        if loader is None:
            raise PickleRefused("a persistent reference outside a torch file")
        self._limits.check_storage(pid)
        return loader(pid)

    def find_class(self, module: str, name: str) -> Any:
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
            stand_in = self._stand_ins.get(qualified)
            if stand_in is None:
                attributes = {"_original_name": _shown_name(module, name), "__module__": __name__}
                stand_in = self._stand_ins[qualified] = type("StandIn", (InertStandIn,), attributes)
            return stand_in
        raise RefusedGlobal(_shown_name(module, name))

    # -- nesting depth -------------------------------------------------------------------------------

    def _depth(self, obj: Any) -> int:
        entry = self._depths.get(id(obj))
        return entry[0] if entry is not None and entry[1] is obj else 0

    def _nested(self, container: Any, items: Any) -> Any:
        depth = 1 + max((self._depth(item) for item in items), default=0)
        depth = max(depth, self._depth(container))
        if depth > MAX_DEPTH:
            raise PickleRefused(f"its data nests deeper than {MAX_DEPTH} levels")
        self._depths[id(container)] = (depth, container)
        return container

    # -- calls -----------------------------------------------------------------------------------------

    def _call(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise PickleRefused("call arguments that are not a tuple")
        if id(func) in _CALLABLE_IDS or _is_stand_in_class(func):
            return func(*args)
        raise PickleRefused(f"it calls a {escaped(type(func).__name__)}, which is not a constructor of data")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ
        self.append(self._call(klass, tuple(args)))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not _is_stand_in_class(cls) or type(args) is not tuple:
            raise PickleRefused("NEWOBJ of something other than a stand-in class")
        self.append(cls.__new__(cls))

    def load_newobj_ex(self) -> None:
        self.stack.pop()  # kwargs
        self.load_newobj()

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, InertStandIn):
            inst.__setstate__(state)
        elif type(inst) not in (dict, OrderedDict):  # a dict's pickled attributes are dropped
            raise PickleRefused(f"it sets the state of a {escaped(type(inst).__name__)}")

    # -- containers --------------------------------------------------------------------------------------

    def _target(self, kinds: tuple[type, ...]) -> Any:
        target = self.stack[-1]
        if type(target) not in kinds and not isinstance(target, InertStandIn):
            raise PickleRefused(f"it adds items to a {escaped(type(target).__name__)}")
        return target

    def _put_items(self, target: Any, items: list) -> None:
        if len(items) % 2:
            raise PickleRefused("a dict with a key but no value")
        self._limits.charge(_ITEM_COST * len(items) // 2)
        for key in items[::2]:
            check_key(key)
        self._nested(target, items[1::2])
        for index in range(0, len(items), 2):
            target[items[index]] = items[index + 1]

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._put_items(self._target((dict, OrderedDict)), [key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._put_items(self._target((dict, OrderedDict)), items)

    def load_dict(self) -> None:
        items = self.pop_mark()
        result: dict = {}
        self._put_items(result, items)
        self.append(result)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,))
        self._limits.charge(_ITEM_COST * len(items))
        for item in items:
            check_key(item)
            target.add(item)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self._limits.charge(_ITEM_COST * len(items))
        for item in items:
            check_key(item)
        self.append(frozenset(items))

    def load_append(self) -> None:
        value = self.stack.pop()
        self._nested(self._target((list,)), [value]).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._nested(self._target((list,)), items).extend(items)

    def load_list(self) -> None:
        items = self.pop_mark()
        self.append(self._nested(items, items))

    def load_tuple(self) -> None:
        items = self.pop_mark()
        self.append(self._nested(tuple(items), items))

    def load_tuple1(self) -> None:
        self.stack[-1] = self._nested((self.stack[-1],), self.stack[-1:])

    def load_tuple2(self) -> None:
        items = self.stack[-2:]
        self.stack[-2:] = [self._nested(tuple(items), items)]

    def load_tuple3(self) -> None:
        items = self.stack[-3:]
        self.stack[-3:] = [self._nested(tuple(items), items)]

    def load_mark(self) -> None:
        if len(self.metastack) >= MAX_DEPTH:
            raise PickleRefused(f"its data nests deeper than {MAX_DEPTH} levels")
        super().load_mark()


def _refuse(what: str):
    def refuse(self: _RestrictedUnpickler) -> None:
        raise PickleRefused(f"it uses {what}, which checkpoints never need")

    return refuse


def _charged(cost: int, handler):
    def run(self: _RestrictedUnpickler) -> None:
        self._limits.charge(cost)
        handler(self)

    return run


def _build_dispatch() -> _Dispatch:
    op = pickle
    overrides = {
        op.REDUCE: _RestrictedUnpickler.load_reduce, op.NEWOBJ: _RestrictedUnpickler.load_newobj,
        op.NEWOBJ_EX: _RestrictedUnpickler.load_newobj_ex, op.BUILD: _RestrictedUnpickler.load_build,
        op.SETITEM: _RestrictedUnpickler.load_setitem, op.SETITEMS: _RestrictedUnpickler.load_setitems,
        op.DICT: _RestrictedUnpickler.load_dict, op.ADDITEMS: _RestrictedUnpickler.load_additems,
        op.FROZENSET: _RestrictedUnpickler.load_frozenset, op.APPEND: _RestrictedUnpickler.load_append,
        op.APPENDS: _RestrictedUnpickler.load_appends, op.LIST: _RestrictedUnpickler.load_list,
        op.TUPLE: _RestrictedUnpickler.load_tuple, op.TUPLE1: _RestrictedUnpickler.load_tuple1,
        op.TUPLE2: _RestrictedUnpickler.load_tuple2, op.TUPLE3: _RestrictedUnpickler.load_tuple3,
        op.MARK: _RestrictedUnpickler.load_mark,
        op.EXT1: _refuse("extension codes"), op.EXT2: _refuse("extension codes"), op.EXT4: _refuse("extension codes"),
        op.PERSID: _refuse("text persistent ids"), op.NEXT_BUFFER: _refuse("out-of-band buffers"),
        op.READONLY_BUFFER: _refuse("out-of-band buffers"),
    }
    containers = {op.EMPTY_DICT, op.DICT, op.EMPTY_SET, op.FROZENSET, op.EMPTY_LIST, op.LIST}
    dispatch = _Dispatch()
    for code, handler in pickle._Unpickler.dispatch.items():
        opcode = bytes([code])
        cost = _CONTAINER_COST if opcode in containers else _OPCODE_COST
        dispatch[code] = _charged(cost, overrides.get(opcode, handler))
    return dispatch


_RestrictedUnpickler.dispatch = _build_dispatch()


def restricted_pickle_module(limits: PickleLimits) -> types.ModuleType:
    """What ``torch.load`` receives as ``pickle_module`` for one load: ``Unpickler`` (subclassed by torch)
    and ``load`` (torch's legacy reader calls it for the file's header records), sharing ``limits``."""
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"_limits": limits, "__module__": __name__})

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return unpickler(io.BytesIO(data), **kwargs).load()

    module = types.ModuleType("ldm_restricted_pickle", "pickle with an allowlisted find_class")
    module.Unpickler = unpickler
    module.load = load
    module.loads = loads
    module.UnpicklingError = pickle.UnpicklingError
    return module


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` (no persistent ids) with the same restrictions; for tests and small records."""
    return restricted_pickle_module(PickleLimits()).loads(data)

