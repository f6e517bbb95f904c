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

- every opcode is charged against one memory budget per load (``pickle_limits.MAX_PICKLE_MEMORY``, shared by
  the five pickles of torch's legacy format), bytes read included; a read or line longer than what is
  left of the file is refused before the buffer is allocated;
- dict keys and set elements must be ``str``/``bytes``/``int`` (below the hash modulus, so no two
  collide)/``float``/``bool``/``None`` or an inert stand-in: nothing built from the file is ever hashed
  recursively, and nesting depth is bounded (``pickle_limits.MAX_DEPTH``);
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

What the table of globals hands out, and why each is harmless with arbitrary arguments, is written in
``ldm.checkpoints.pickle_globals``; the budgets are in ``ldm.checkpoints.pickle_limits``.
"""

from __future__ import annotations

import io
import pickle
import types
from collections import OrderedDict
from typing import Any

from ldm.checkpoints.errors import PickleRefused
from ldm.checkpoints.pickle_globals import InertStandIn, check_key, find_global, is_data_constructor, is_stand_in_class
from ldm.checkpoints.pickle_limits import CONTAINER_COST, ITEM_COST, MAX_DEPTH, OPCODE_COST, BoundedReader, PickleLimits
from ldm.messages import escaped

__all__ = ["RestrictedUnpickler", "restricted_pickle_module", "restricted_loads"]


class _Dispatch(dict):
    def __missing__(self, opcode: int):
        raise pickle.UnpicklingError(f"invalid pickle opcode {opcode:#04x}")


class RestrictedUnpickler(pickle._Unpickler):
    """See the module docstring. ``_limits`` is set on the per-load subclass."""

    _limits: PickleLimits

    def __init__(self, file: Any, **kwargs: Any) -> None:
        kwargs.pop("buffers", None)  # out-of-band buffers are refused anyway
        super().__init__(BoundedReader(file, self._limits), **kwargs)
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
        return find_global(module, name, self._stand_ins)

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
        if is_data_constructor(func):
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
        if not is_stand_in_class(cls) or type(args) is not tuple:
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
        self._limits.charge(ITEM_COST * len(items) // 2)
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
        self._limits.charge(ITEM_COST * len(items))
        for item in items:
            check_key(item)
            target.add(item)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self._limits.charge(ITEM_COST * len(items))
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
    def refuse(self: RestrictedUnpickler) -> None:
        raise PickleRefused(f"it uses {what}, which checkpoints never need")

    return refuse


def _charged(cost: int, handler):
    def run(self: RestrictedUnpickler) -> None:
        self._limits.charge(cost)
        handler(self)

    return run


def _build_dispatch() -> _Dispatch:
    op = pickle
    overrides = {
        op.REDUCE: RestrictedUnpickler.load_reduce, op.NEWOBJ: RestrictedUnpickler.load_newobj,
        op.NEWOBJ_EX: RestrictedUnpickler.load_newobj_ex, op.BUILD: RestrictedUnpickler.load_build,
        op.SETITEM: RestrictedUnpickler.load_setitem, op.SETITEMS: RestrictedUnpickler.load_setitems,
        op.DICT: RestrictedUnpickler.load_dict, op.ADDITEMS: RestrictedUnpickler.load_additems,
        op.FROZENSET: RestrictedUnpickler.load_frozenset, op.APPEND: RestrictedUnpickler.load_append,
        op.APPENDS: RestrictedUnpickler.load_appends, op.LIST: RestrictedUnpickler.load_list,
        op.TUPLE: RestrictedUnpickler.load_tuple, op.TUPLE1: RestrictedUnpickler.load_tuple1,
        op.TUPLE2: RestrictedUnpickler.load_tuple2, op.TUPLE3: RestrictedUnpickler.load_tuple3,
        op.MARK: RestrictedUnpickler.load_mark,
        op.EXT1: _refuse("extension codes"), op.EXT2: _refuse("extension codes"), op.EXT4: _refuse("extension codes"),
        op.PERSID: _refuse("text persistent ids"), op.NEXT_BUFFER: _refuse("out-of-band buffers"),
        op.READONLY_BUFFER: _refuse("out-of-band buffers"),
    }
    containers = {op.EMPTY_DICT, op.DICT, op.EMPTY_SET, op.FROZENSET, op.EMPTY_LIST, op.LIST}
    dispatch = _Dispatch()
    for code, handler in pickle._Unpickler.dispatch.items():
        opcode = bytes([code])
        cost = CONTAINER_COST if opcode in containers else OPCODE_COST
        dispatch[code] = _charged(cost, overrides.get(opcode, handler))
    return dispatch


RestrictedUnpickler.dispatch = _build_dispatch()


def restricted_pickle_module(limits: PickleLimits) -> types.ModuleType:
    """What ``torch.load`` receives as ``pickle_module`` for one load: ``Unpickler`` (subclassed by torch)
    and ``load`` (torch's legacy reader calls it for the file's header records), sharing ``limits``."""
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"_limits": limits, "__module__": __name__})

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

