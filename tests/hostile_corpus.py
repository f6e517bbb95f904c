#!/usr/bin/env python3
"""Hostile checkpoints and configs, generated on the fly (no binaries are committed).

Every case must be refused in one line (exit 2 from the scripts) within 20 s and 1 GB of RSS, and no
payload may create its marker file. Families:

- malformed and crafted files and configs: deep tuple keys, an OrderedDict whose state sets ``get``, colliding
  integer keys, pickle/tar polyglots with links to FIFOs, zero-filled and sparse files, ``bytearray(N)``,
  compressed / bit-flipped / bomb zips, unusable weights (int, bool, complex, NaN, inf, stride 0), names
  with newlines and ANSI escapes, bad configs;
- opcode-level attacks on the unpickler: declared sizes beyond the file (BINBYTES8, FRAME, storages),
  unbounded lines, memo and stack floods, refused opcodes;
- container attacks on the zip reader (picklescan's test-suite families: flag bits, directory/header
  mismatch, duplicate names, data before the archive, entry-count floods);
- gadget families from picklescan's and fickling's test suites and advisories: ~90 dangerous callables,
  each pickled with protocols 0, 2 and 4 inside a bare pickle, a legacy torch file and a torch zip, plus
  picklescan's hand-assembled ones (sour pickles, INST, memo name swaps, nested ``pickle.loads``) and
  fickling's own payload injection into a real torch file.

``python tests/hostile_corpus.py DIR`` writes the corpus and prints one JSON line per case;
``python tests/hostile_corpus.py --check DIR`` also reads every case in-process and prints the outcome
(used by tests/test_hostile_corpus.py, in a child process so that a crash cannot take pytest with it).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import struct
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


@dataclass
class Case:
    """One hostile input: ``flag`` is the command-line flag it is given to (``--ckpt`` or ``--config``)."""

    name: str
    path: str
    flag: str
    expect: str  # a fragment of the one-line error
    marker: str | None = None
    slow: bool = False
    cli_expect: str | None = None  # the command line refuses it before the reader, in its own words


class Corpus:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cases: list[Case] = []
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "markers").mkdir(exist_ok=True)

    def marker(self, name: str) -> str:
        return str(self.directory / "markers" / name)

    def add(self, name: str, data: bytes | None, expect: str, suffix: str = ".ckpt", flag: str = "--ckpt",
            marker: str | None = None, slow: bool = False, path: Path | None = None, cli_expect: str | None = None) -> Path:
        path = path or self.directory / f"{name}{suffix}"
        if data is not None:
            path.write_bytes(data)
        self.cases.append(Case(name, str(path), flag, expect, marker, slow, cli_expect))
        return path


# ---------------------------------------------------------------------------------------------------
# pickle and container helpers
# ---------------------------------------------------------------------------------------------------

P = pickle


def legacy_file(main_pickle: bytes, storage_keys: bytes = b"\x80\x02]q\x00.") -> bytes:
    """A legacy (non-zip) torch file around a hand-written main pickle."""
    import torch

    header = b"".join(
        pickle.dumps(value, protocol=2)
        for value in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                      {"protocol_version": 1001, "little_endian": True})
    )
    return header + main_pickle + storage_keys


def torch_zip(data_pkl: bytes, records: dict[str, bytes] | None = None, compression: int = zipfile.ZIP_STORED) -> bytes:
    """A torch zip archive (``archive/data.pkl``, ``version``, ``byteorder``, ``data/<key>``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, value in (records or {}).items():
            archive.writestr(f"archive/data/{key}", value)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def _strip(body: bytes) -> bytes:
    """A pickle's opcodes without PROTO, FRAME and STOP, to splice into another pickle."""
    out = bytearray()
    ops = list(pickletools.genops(body))
    for index, (opcode, _, position) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(body)
        if opcode.name not in ("PROTO", "FRAME", "STOP"):
            out += body[position:end]
    return bytes(out)


def _text(value: str, protocol: int) -> bytes:
    if protocol == 0:
        return b"V" + value.encode("raw_unicode_escape") + b"\n"
    data = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def call_pickle(module: str, name: str, args: tuple, protocol: int) -> bytes:
    """``{"state_dict": {}, "evil": module.name(*args)}`` with the given protocol, written by hand."""
    out = bytearray(b"\x80" + bytes([protocol]) if protocol >= 2 else b"")
    out += b"(d" if protocol == 0 else b"}"
    out += _text("state_dict", protocol) + (b"(d" if protocol == 0 else b"}") + b"s"
    out += _text("evil", protocol)
    if protocol >= 4:
        out += _text(module, 2) + _text(name, 2) + P.STACK_GLOBAL
    else:
        out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    out += _strip(pickle.dumps(args, protocol=protocol))
    out += P.REDUCE + P.SETITEM + P.STOP
    return bytes(out)


# ---------------------------------------------------------------------------------------------------
# the gadgets: dangerous callables from picklescan's and fickling's test suites and advisories
# ---------------------------------------------------------------------------------------------------


def gadgets(marker: str) -> list[tuple[str, str, tuple]]:
    touch = f"touch {marker}"
    opener = f"open({marker!r}, 'w').close()"
    return [
        ("builtins", "eval", (opener,)), ("builtins", "exec", (opener,)), ("__builtin__", "eval", (opener,)),
        ("__builtin__", "apply", ("x",)), ("builtins", "compile", (opener, "x", "exec")),
        ("builtins", "open", (marker, "w")), ("builtins", "getattr", ("x", "upper")),
        ("builtins", "setattr", ("x", "y", 1)), ("builtins", "__import__", ("os",)), ("builtins", "globals", ()),
        ("builtins", "breakpoint", ()), ("builtins", "input", ()), ("builtins", "vars", ()), ("builtins", "dict", ()),
        ("builtins", "type", ("X", (), {})), ("builtins", "object", ()), ("builtins", "memoryview", (b"x",)),
        ("os", "system", (touch,)), ("posix", "system", (touch,)), ("nt", "system", (touch,)),
        ("os", "popen", (touch,)), ("os", "execv", ("/bin/touch", ["touch", marker])),
        ("os", "spawnlp", (0, "touch", "touch", marker)), ("os", "remove", (marker,)), ("os", "fork", ()),
        ("os", "kill", (0, 9)), ("os", "putenv", ("X", "1")), ("pty", "spawn", (["touch", marker],)),
        ("subprocess", "Popen", (["touch", marker],)), ("subprocess", "run", (["touch", marker],)),
        ("subprocess", "call", (["touch", marker],)), ("subprocess", "check_call", (["touch", marker],)),
        ("subprocess", "check_output", (["touch", marker],)), ("subprocess", "getoutput", (touch,)),
        ("subprocess", "getstatusoutput", (touch,)), ("commands", "getoutput", (touch,)),
        ("socket", "create_connection", (("127.0.0.1", 9),)), ("socket", "socket", ()),
        ("http.client", "HTTPSConnection", ("example.com",)), ("httplib", "HTTPSConnection", ("example.com",)),
        ("urllib.request", "urlopen", ("http://127.0.0.1:9",)), ("requests.api", "get", ("http://127.0.0.1:9",)),
        ("aiohttp.client", "ClientSession", ()), ("webbrowser", "open", ("http://127.0.0.1:9",)),
        ("smtplib", "SMTP", ("127.0.0.1",)), ("ftplib", "FTP", ("127.0.0.1",)), ("sys", "exit", (0,)),
        ("pickle", "loads", (b"I12345\n.",)), ("_pickle", "loads", (b"I12345\n.",)), ("cPickle", "loads", (b"I1\n.",)),
        ("marshal", "loads", (b"N",)), ("dill", "loads", (b"N.",)), ("torch", "load", (marker,)),
        ("torch.serialization", "load", (marker,)), ("torch.storage", "_load_from_bytes", (b"x",)),
        ("torch.hub", "load", ("x", "y")), ("torch.jit", "load", (marker,)), ("numpy", "load", (marker,)),
        ("numpy.testing._private.utils", "runstring", (opener, {})), ("operator", "attrgetter", ("system",)),
        ("_operator", "attrgetter", ("system",)), ("operator", "methodcaller", ("system", touch)),
        ("operator", "itemgetter", (0,)), ("functools", "partial", ("x",)),
        ("functools", "reduce", ("x", [])), ("importlib", "import_module", ("os",)),
        ("runpy", "_run_code", (opener, {})), ("runpy", "run_path", (marker,)),
        ("code", "InteractiveInterpreter", ()), ("pdb", "run", (opener,)), ("timeit", "timeit", (opener,)),
        ("cProfile", "run", (opener,)), ("profile", "run", (opener,)), ("trace", "Trace", ()),
        ("pydoc", "pipepager", ("x", touch)), ("pydoc", "locate", ("os.system",)),
        ("uuid", "_get_command_stdout", ("touch", marker)), ("_osx_support", "_read_output", (touch,)),
        ("_aix_support", "_read_cmd_output", (touch,)), ("imaplib", "IMAP4_stream", (touch,)),
        ("test.support.script_helper", "assert_python_ok", ("-c", opener)),
        ("_pyrepl.pager", "pipe_pager", ("x", touch)), ("io", "FileIO", (marker, "w")),
        ("_io", "FileIO", (marker, "w")), ("logging", "FileHandler", (marker,)), ("shutil", "rmtree", (marker,)),
        ("shutil", "move", (marker, marker + "2")), ("tempfile", "mktemp", ()), ("ctypes", "CDLL", ("libc.so.6",)),
        ("types", "FunctionType", ("x", {})), ("types", "CodeType", ()), ("copyreg", "_reconstructor", ("x", "y", None)),
        ("copyreg", "__newobj__", ("x",)), ("collections", "defaultdict", ()), ("codecs", "open", (marker, "w")),
        ("zipimport", "zipimporter", (marker,)), ("pkgutil", "resolve_name", ("os:system",)),
        ("venv", "create", (marker,)), ("ensurepip", "_run_pip", (["--version"],)), ("pip", "main", (["--version"],)),
        ("site", "addsitedir", (marker,)), ("torch._inductor.codecache", "compile_file", ("x", "y", ["touch", marker])),
        ("torch.utils.cpp_extension", "load_inline", ("x", opener)), ("numpy.f2py.crackfortran", "myeval", (opener,)),
        ("asyncio.subprocess", "create_subprocess_shell", (touch,)), ("_codecs", "decode", (b"x", "rot13")),
        ("torch.fx.graph_module", "_deserialize_graph_module", ({}, {})), ("torch", "Tensor", ()),
        ("torch.storage", "TypedStorage", (10**12,)), ("torch", "UntypedStorage", (10**12,)),
    ]


def add_gadget_cases(corpus: Corpus) -> None:
    """Every gadget x protocol 0/2/4 x (bare pickle, legacy torch file, torch zip)."""
    for index, _ in enumerate(gadgets("M")):
        for protocol in (0, 2, 4):
            for container in ("bare", "legacy", "zip"):
                marker = corpus.marker(f"gadget{index}_{protocol}_{container}")
                module, name, args = gadgets(marker)[index]
                body = call_pickle(module, name, args, protocol)
                if container == "legacy":
                    body = legacy_file(body)
                elif container == "zip":
                    body = torch_zip(body)
                label = f"gadget_{module}.{name}_p{protocol}_{container}"
                # A bare protocol-0 pickle does not even look like a checkpoint.
                expect = "not a checkpoint" if (protocol, container) == (0, "bare") else "which could run code"
                if (module, name) == ("torch", "Tensor") and (protocol, container) != (0, "bare"):  # a token
                    expect = "not a constructor of data"
                corpus.add(label, body, expect, suffix=".pt", marker=marker)


# ---------------------------------------------------------------------------------------------------
# picklescan's hand-assembled pickles and fickling's injection
# ---------------------------------------------------------------------------------------------------


def add_handwritten_pickles(corpus: Corpus) -> None:
    marker = corpus.marker("sour")
    sour = (  # "Sour Pickles" (BlackHat 2011): globals/compile/eval/getattr through the memo
        b"c__builtin__\nglobals\n(tRp100\n0c__builtin__\ncompile\n(S'open(\"" + marker.encode() + b"\",\"w\")'\n"
        b"S''\nS'exec'\ntRp101\n0c__builtin__\neval\n(g101\ng100\ntRp102\n."
    )
    corpus.add("picklescan_sour_pickle", legacy_file(sour), "refusing to load", marker=marker)
    marker = corpus.marker("inst")
    inst = b"(S'open(\"" + marker.encode() + b"\",\"w\")'\ni__builtin__\nexec\n."
    corpus.add("picklescan_inst_opcode", legacy_file(inst), "refusing to load", marker=marker)
    corpus.add("picklescan_inst_bare", inst, "not a checkpoint", suffix=".pkl", marker=marker)
    marker = corpus.marker("swap")
    swap = b"".join([  # names memoised as "torch"/"LongStorage", then fetched as os.system
        b"\x80\x04", P.UNICODE, b"os\n", P.PUT, b"2\n", P.POP, P.UNICODE, b"system\n", P.PUT, b"3\n", P.POP,
        P.UNICODE, b"torch\n", P.PUT, b"0\n", P.POP, P.UNICODE, b"LongStorage\n", P.PUT, b"1\n", P.POP,
        P.GET, b"2\n", P.GET, b"3\n", P.STACK_GLOBAL, P.MARK, P.UNICODE, b"touch " + marker.encode() + b"\n",
        P.TUPLE, P.REDUCE, P.STOP,
    ])
    corpus.add("picklescan_memo_name_swap", torch_zip(swap), "refusing to load", marker=marker)
    marker = corpus.marker("nested")
    inner = call_pickle("posix", "system", (f"touch {marker}",), 2)
    corpus.add("picklescan_nested_loads", torch_zip(call_pickle("pickle", "loads", (inner,), 2)), "refusing", marker=marker)
    marker = corpus.marker("second")
    benign_then_evil = pickle.dumps(["a", "b"], protocol=2) + call_pickle("posix", "system", (f"touch {marker}",), 2)
    corpus.add("picklescan_benign_then_malicious", benign_then_evil, "damaged", suffix=".pkl", marker=marker)
    marker = corpus.marker("attrgetter")
    chain = b"".join([  # operator.attrgetter("system")(__import__("os"))("touch ...")
        b"\x80\x04", _text("operator", 2), _text("attrgetter", 2), P.STACK_GLOBAL, _text("system", 2), P.TUPLE1, P.REDUCE,
        _text("builtins", 2), _text("__import__", 2), P.STACK_GLOBAL, _text("os", 2), P.TUPLE1, P.REDUCE, P.TUPLE1,
        P.REDUCE, _text(f"touch {marker}", 2), P.TUPLE1, P.REDUCE, P.STOP,
    ])
    corpus.add("picklescan_attrgetter_chain", torch_zip(chain), "refusing to load", marker=marker)
    corpus.add("picklescan_tensor_cdata", legacy_file(b"\x80\x04\x8c\x05torch\x94\x8c\x06Tensor\x94\x93)}\x8c\x05cdata\x94K\x00s\x92."), "refusing")
    corpus.add("picklescan_invalid_bytes", b"\x80\x02}q\x00\xff\xfe garbage", "damaged")


def add_fickling_injections(corpus: Corpus, clean: Path) -> None:
    """fickling's own PyTorch payload injection (both methods) into a real tiny checkpoint."""
    try:
        from fickling.pytorch import PyTorchModelWrapper  # a test extra (setup.py)
    except ImportError:
        return

    for method in ("insertion", "combination"):
        marker = corpus.marker(f"fickling_{method}")
        target = corpus.directory / f"fickling_{method}.ckpt"
        PyTorchModelWrapper(clean).inject_payload(
            f"open({marker!r}, 'w').close()", target, injection=method
        )
        corpus.add(f"fickling_inject_{method}", None, "refusing to load", marker=marker, path=target)


# ---------------------------------------------------------------------------------------------------
# malformed and crafted files (deep keys, colliding keys, polyglots, bad weights), and opcode-level attacks
# ---------------------------------------------------------------------------------------------------


def add_unpickler_attacks(corpus: Corpus) -> None:
    deep_key = b"\x80\x04}" + b"N" + P.TUPLE1 * 1_000_000 + b"N" + P.SETITEM + P.STOP
    corpus.add("deep_tuple_key", legacy_file(deep_key), "nests deeper")
    deep_list = b"\x80\x02" + P.EMPTY_LIST * 200_000 + P.APPEND * 199_999 + P.STOP
    corpus.add("deep_list_value", torch_zip(deep_list), "nests deeper", slow=True)
    deep_marks = b"\x80\x02" + P.MARK * 100_000 + P.STOP
    corpus.add("deep_marks", torch_zip(deep_marks), "nests deeper")
    modulus = 2**61 - 1
    colliding = b"\x80\x04}(" + b"".join(
        b"\x8a\x08" + struct.pack("<q", (i * modulus) % 2**63) + b"N" for i in range(1, 200_001)
    ) + b"u."
    corpus.add("colliding_int_keys", legacy_file(colliding), "dict key", slow=True)
    marker = corpus.marker("get")
    get_attr = (  # an OrderedDict whose pickled state sets `get` to os.system
        b"\x80\x02ccollections\nOrderedDict\n)R}X\x03\x00\x00\x00getcposix\nsystem\nsbX\n\x00\x00\x00state_dictX\x04\x00\x00\x00"
        + b"touch " + marker.encode()[:0] + b"s."
    )
    corpus.add("ordered_dict_get_state", torch_zip(get_attr), "refusing", marker=marker)
    bad_args = [
        ("torch_size_str", b"\x80\x02ctorch\nSize\nX\x03\x00\x00\x00abc\x85R."),
        ("ordered_dict_int", b"\x80\x02ccollections\nOrderedDict\nK\x05\x85R."),
        ("rebuild_none", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(NK\x00)))\x89}tR."),
        ("complex_str", b"\x80\x02c__builtin__\ncomplex\nX\x03\x00\x00\x00inf\x85R."),
        ("device_list", b"\x80\x02ctorch\ndevice\n]\x85R."),
        ("set_of_lists", b"\x80\x02c__builtin__\nset\n]]a\x85R."),
    ]
    for name, body in bad_args:
        corpus.add(f"allowed_constructor_{name}", legacy_file(body), "refusing")
    for index in range(3):
        bomb = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x2f\x68\x59\x85R."  # bytearray(1.5e9)
        corpus.add(f"bytearray_bomb_{index}", legacy_file(bomb), "bytearray")
    corpus.add("binbytes8_1tb", b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"x" * 64, "damaged")
    corpus.add("binunicode8_huge", torch_zip(b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"x."), "damaged")
    corpus.add("frame_1tb", torch_zip(b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N."), "damaged")
    corpus.add("long_line", b"\x80\x02c" + b"a" * 200_000 + b"\nb\n.", "text line")
    corpus.add("long_binput_4g", torch_zip(b"\x80\x02}r\xff\xff\xff\xff."), "no tensors")
    corpus.add("empty_list_flood", torch_zip(b"\x80\x02" + P.EMPTY_LIST * 3_000_000 + b"."), "MiB of objects", slow=True)
    corpus.add("empty_set_flood", torch_zip(b"\x80\x04" + P.EMPTY_SET * 2_000_000 + b"."), "MiB of objects", slow=True)
    corpus.add("ext1_opcode", legacy_file(b"\x80\x02\x82\x01."), "extension codes")
    corpus.add("persid_text", legacy_file(b"P0\n."), "persistent")
    corpus.add("next_buffer", torch_zip(b"\x80\x05\x97."), "out-of-band")
    corpus.add("newobj_of_set", legacy_file(b"\x80\x02c__builtin__\nfrozenset\n]\x85\x81."), "NEWOBJ")
    corpus.add("build_on_function", legacy_file(b"\x80\x02ctorch\ndevice\n}X\x0c\x00\x00\x00__defaults__)sb."), "state")
    corpus.add("setitem_on_tensor_token", legacy_file(b"\x80\x02ctorch\nTensor\nK\x00K\x01s."), "adds items")
    # storages: a legacy file that declares a 1 TB storage; a zip whose pickle asks more than its record
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu\x8a\x06\x00\x00\x00\x00\x00\x01Ntq\x00Q"
    big = b"\x80\x02}X\x01\x00\x00\x00a" + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    corpus.add("legacy_storage_1tb", legacy_file(big, b"\x80\x02]X\x01\x00\x00\x000a."), "more tensor data")
    zip_storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuM\x00\x10tQ"
    zip_big = b"\x80\x02}X\x01\x00\x00\x00a" + b"ctorch._utils\n_rebuild_tensor_v2\n(" + zip_storage + b"K\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    corpus.add("zip_storage_beyond_record", torch_zip(zip_big, {"0": b"\0" * 16}), "smaller than declared")
    view = b"\x80\x02}X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\n(" + zip_storage.replace(b"M\x00\x10", b"K\x04") + b"K\x00J\x00\xca\x9a;\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    corpus.add("tensor_beyond_storage", torch_zip(view, {"0": b"\0" * 16}), "damaged")


def _zip_records(clean: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(clean) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def _rezip(records, compression=zipfile.ZIP_STORED, rename=None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for info, data in records:
            archive.writestr((rename or (lambda n: n))(info.filename), data)
    return buffer.getvalue()


def add_zip_attacks(corpus: Corpus, clean: Path) -> None:
    data = bytearray(clean.read_bytes())
    records = _zip_records(clean)
    storage_info = next(info for info, _ in records if "/data/" in info.filename and info.file_size > 64)
    flipped = bytearray(data)
    name_length, extra_length = struct.unpack_from("<HH", data, storage_info.header_offset + 26)
    flipped[storage_info.header_offset + 30 + name_length + extra_length + 40] ^= 0x10  # inside the tensor data
    corpus.add("zip_bit_flip", bytes(flipped), "damaged")
    zeros = [(info, b"\0" * 50_000_000 if "/data/" in info.filename and info is storage_info else body) for info, body in records]
    corpus.add("zip_bomb_record", _rezip(zeros, zipfile.ZIP_DEFLATED), "decompresses", slow=False)
    for bit in (0x1, 0x20, 0x40):
        patched = bytearray(data)
        directory = data.rfind(b"PK\x01\x02" + data[data.find(b"PK\x01\x02") + 4: data.find(b"PK\x01\x02") + 6])
        position = data.find(b"PK\x01\x02")
        while position >= 0:  # set the flag in every central directory entry
            flags = struct.unpack_from("<H", patched, position + 8)[0] | bit
            struct.pack_into("<H", patched, position + 8, flags)
            position = data.find(b"PK\x01\x02", position + 4)
        del directory
        corpus.add(f"zip_flag_{bit:#x}", bytes(patched), "")
    renamed = bytearray(data)
    first_local = 0
    name_length = struct.unpack_from("<H", renamed, first_local + 26)[0]
    renamed[first_local + 30 + name_length - 1] ^= 0x01  # the local header names another file
    corpus.add("zip_local_name_mismatch", bytes(renamed), "damaged")
    duplicate = records + [records[0]]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, body in duplicate:
            archive.writestr(info.filename, body)
    import warnings

    corpus.add("zip_duplicate_names", buffer.getvalue(), "twice")
    corpus.add("zip_with_prefix_data", b"PK\x03\x04" + b"\0" * 60 + bytes(data), "damaged")
    zip64_end = data.rfind(b"PK\x06\x06")  # torch always writes zip64 end records
    for label, claimed, expect in (("lie", len(records) + 8, "the directory lists"), ("flood", 10**9, "at most")):
        count = bytearray(data)
        struct.pack_into("<QQ", count, zip64_end + 24, claimed, claimed)
        corpus.add(f"zip_entry_count_{label}", bytes(count), expect)
    corpus.add("zip_truncated_directory", bytes(data[: len(data) - 30]), "damaged")
    corpus.add("zip_other_folders", _rezip(records, rename=lambda n: n if "data.pkl" in n else "other/" + n), "one folder")
    corpus.add("zip_no_data_pkl", _rezip([r for r in records if "data.pkl" not in r[0].filename]), "without data.pkl")
    prefix = records[0][0].filename.split("/")[0]
    torchscript = _rezip(records + [(zipfile.ZipInfo(f"{prefix}/constants.pkl"), b"\x80\x02).")])
    corpus.add("zip_torchscript", torchscript, "TorchScript")
    warnings.simplefilter("default")


def add_file_kinds(corpus: Corpus, clean: Path, tiny_state: dict) -> None:
    zero = corpus.directory / "zeros_1gib.ckpt"
    with open(zero, "wb") as handle:
        handle.truncate(2**30)  # sparse: costs no disk
    corpus.add("zero_filled_1gib", None, "starts with zeros", path=zero)
    corpus.add("zero_filled_safetensors", b"\0" * 8192, "starts with zeros", suffix=".safetensors")
    fifo = corpus.directory / "fifo.ckpt"
    if not fifo.exists():
        os.mkfifo(fifo)
    not_a_file = "neither a file nor a diffusers model folder"  # the script's check of --ckpt, before the reader
    corpus.add("fifo", None, "not a regular file", path=fifo, cli_expect=not_a_file)
    corpus.add("dev_zero", None, "not a regular file", path=Path("/dev/zero"), cli_expect=not_a_file)
    corpus.add("dev_stdin", None, "not a regular file", path=Path("/proc/self/fd/0"), cli_expect=not_a_file)
    polyglot = _tar_pickle_polyglot(fifo)
    corpus.add("tar_pickle_polyglot_fifo", polyglot, "tar format")
    corpus.add("empty", b"", "empty")
    corpus.add("png_named_pt", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a checkpoint", suffix=".pt")
    data = clean.read_bytes()
    corpus.add("zip_truncated_half", data[: len(data) // 2], "damaged")
    corpus.add("safetensors_huge_header", struct.pack("<Q", 2**40) + b'{"' + b" " * 64, "damaged safetensors", suffix=".safetensors")
    corpus.add("safetensors_bad_json", struct.pack("<Q", 16) + b"{\"a\": [1, 2, 3,", "damaged safetensors", suffix=".safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}).encode()
    corpus.add("safetensors_offsets_beyond", struct.pack("<Q", len(header)) + header + b"\0" * 16, "damaged safetensors", suffix=".safetensors")
    deep = b"{" + b"\"a\":[" * 5000 + b"]" * 5000 + b"}"
    corpus.add("safetensors_deep_json", struct.pack("<Q", len(deep)) + deep, "damaged safetensors", suffix=".safetensors")


def _tar_pickle_polyglot(fifo: Path) -> bytes:
    """A file that is a protocol-2 pickle *and* a valid tar whose ``storages`` links to a FIFO."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        first = tarfile.TarInfo("\udc80\x02}q\x00.")  # surrogateescape: the name's bytes start 0x80 0x02
        first.size = 0
        archive.addfile(first)
        link = tarfile.TarInfo("storages")
        link.type = tarfile.SYMTYPE
        link.linkname = str(fifo)
        archive.addfile(link)
    return buffer.getvalue()


def add_weight_cases(corpus: Corpus, tiny_state: dict) -> None:
    import torch
    from ldm.loading.random_weights import save_checkpoint

    victim = "model.diffusion_model.input_blocks.0.0.weight"
    variants = {
        "weights_int32": (lambda t: t.to(torch.int32), "dtype int32"),
        "weights_bool": (lambda t: t > 0, "dtype bool"),
        "weights_complex": (lambda t: t.to(torch.complex64), "dtype complex64"),
        "weights_nan": (lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("nan")), "NaN"),
        "weights_inf": (lambda t: t.clone().index_fill_(0, torch.tensor([1]), float("inf")), "NaN or infinite"),
        "weights_stride0": (lambda t: t[:1].expand_as(t), "share memory"),
    }
    for name, (change, expect) in variants.items():
        state = dict(tiny_state)
        state[victim] = change(state[victim])
        path = corpus.directory / f"{name}.ckpt"
        torch.save({"state_dict": state}, path)
        corpus.add(name, None, expect, path=path)
        if name in ("weights_nan", "weights_int32", "weights_bool"):
            state[victim] = state[victim].contiguous()
            save_checkpoint(state, corpus.directory / f"{name}.safetensors")
            corpus.add(name + "_safetensors", None, expect, path=corpus.directory / f"{name}.safetensors")
    state = dict(tiny_state)
    evil_name = "model.diffusion_model.x\n\x1b[2J\x1b]0;pwned\x07\u202eevil"
    state[evil_name] = torch.full((2,), float("nan"))
    torch.save({"state_dict": state}, corpus.directory / "escape_name.ckpt")
    corpus.add("tensor_name_with_escapes", None, "\\n\\x1b[2J", path=corpus.directory / "escape_name.ckpt")


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------


def add_config_cases(corpus: Corpus) -> None:
    base = TINY_CONFIG.read_text()
    edits = {
        "num_heads_0": (("num_heads: 2", "num_heads: 0"), "num_heads: 0"),
        "num_heads_text": (("num_heads: 2", "num_heads: two"), "num_heads: two"),
        "num_heads_bool": (("num_heads: 2", "num_heads: true"), "num_heads"),
        "scale_factor_nan": (("scale_factor: 0.18215", "scale_factor: .nan"), "scale_factor: nan"),
        "scale_factor_text": (("scale_factor: 0.18215", "scale_factor: big"), "scale_factor"),
        "num_res_blocks_100000": (("num_res_blocks: 1\n        channel_mult", "num_res_blocks: 100000\n        channel_mult"), "num_res_blocks: 100000"),
        "channel_mult_text": (("channel_mult: [ 1, 2 ]", "channel_mult: abc"), "channel_mult"),
        "channel_mult_huge": (("channel_mult: [ 1, 2 ]", "channel_mult: [1, 2, 4, 8, 16, 32, 64, 128, 256]"), "channel_mult"),
        "model_channels_33": (("model_channels: 32", "model_channels: 33"), "multiple of 32"),
        "context_dim_mismatch": (("context_dim: 32", "context_dim: 48"), "context_dim"),
        "timesteps_0": (("timesteps: 1000", "timesteps: 0"), "timesteps: 0"),
        "linear_start_negative": (("linear_start: 0.00085", "linear_start: -1"), "linear_start"),
        "hidden_act_evil": (("projection_dim: 32", "projection_dim: 32\n        hidden_act: \"os.system\\n\\x1b[2J\""), "hidden_act"),
        "interpolation_missing": (("num_heads: 2", "num_heads: ${nowhere}"), "cannot read config"),
        "params_list": (("  params:\n    linear_start", "  params: [1]\n  old:\n    linear_start"), "not a mapping"),
        "yaml_syntax": (("num_heads: 2", "num_heads: [2"), "cannot read config"),
    }
    for name, ((old, new), expect) in edits.items():
        assert old in base, name
        corpus.add(f"config_{name}", base.replace(old, new, 1).encode(), expect, suffix=".yaml", flag="--config")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    corpus.add("config_billion_laughs", laughs.encode(), "aliases", suffix=".yaml", flag="--config")
    corpus.add("config_huge", b"# " + b"x" * (2**21) + b"\n", "a model config is a few KB", suffix=".yaml", flag="--config")
    corpus.add("config_not_utf8", b"model: \xff\xfe\n", "UTF-8", suffix=".yaml", flag="--config")
    corpus.add("config_fifo", None, "not a regular file", flag="--config", path=corpus.directory / "fifo.ckpt")
    corpus.add("config_dev_zero", None, "not a regular file", flag="--config", path=Path("/dev/zero"))
    corpus.add("config_deep", (b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n"), "nests brackets", suffix=".yaml", flag="--config")


# ---------------------------------------------------------------------------------------------------
# building and checking
# ---------------------------------------------------------------------------------------------------


def build_corpus(directory: Path) -> list[Case]:
    """Write every case under ``directory`` (about 1,000 files, 60 MB of real disk) and return them."""
    import torch
    from ldm.config import load_model_config
    from ldm.loading.random_weights import random_state_dict

    corpus = Corpus(directory)
    # The UNet part of the tiny model (2 MB): every case fails before a model is built.
    full = random_state_dict(load_model_config(TINY_CONFIG), seed=7)
    tiny_state = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    clean = directory / "clean_tiny.ckpt"
    torch.save({"state_dict": tiny_state}, clean)
    add_gadget_cases(corpus)
    add_handwritten_pickles(corpus)
    add_fickling_injections(corpus, clean)
    add_unpickler_attacks(corpus)
    add_zip_attacks(corpus, clean)
    add_file_kinds(corpus, clean, tiny_state)
    add_weight_cases(corpus, tiny_state)
    add_config_cases(corpus)
    return corpus.cases


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def check_in_process(cases: list[Case]) -> None:
    """Read every case here, printing one JSON line each (flushed before the next, so a crash names its case)."""
    import time

    from ldm.checkpoints.errors import CheckpointError
    from ldm.checkpoints.reader import read_checkpoint
    from ldm.config import load_model_config
    from ldm.errors import ConfigError

    for case in cases:
        print(json.dumps({"start": case.name}), flush=True)
        started, rss_before = time.process_time(), _peak_rss()  # CPU time: a shared machine's load is not the case's
        try:
            (read_checkpoint if case.flag == "--ckpt" else load_model_config)(case.path)
            outcome, message = "loaded", ""
        except (CheckpointError, ConfigError) as error:
            outcome, message = "refused", str(error)
        except BaseException as error:  # noqa: BLE001 - reported, not hidden
            outcome, message = "crashed", f"{type(error).__name__}: {error}"
        print(json.dumps({
            "name": case.name, "outcome": outcome, "message": message, "seconds": time.process_time() - started,
            "rss_growth": _peak_rss() - rss_before,
            "marker_created": bool(case.marker and Path(case.marker).exists()),
        }), flush=True)


def write_manifest(cases: list[Case], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(case)) + "\n" for case in cases))


def read_manifest(path: Path) -> list[Case]:
    return [Case(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    """``DIR``: build and print the manifest; ``--check DIR``: build and read every case;
    ``--check-manifest FILE [--skip-slow] [NAME...]``: read the (named) cases of an already built corpus."""
    if argv[:1] == ["--check-manifest"]:
        cases = read_manifest(Path(argv[1]))
        if "--skip-slow" in argv[2:]:
            cases = [case for case in cases if not case.slow]
        wanted = set(argv[2:]) - {"--skip-slow"}
        check_in_process([case for case in cases if not wanted or case.name in wanted])
        return 0
    check = "--check" in argv
    cases = build_corpus(Path([a for a in argv if a != "--check"][0]))
    if check:
        check_in_process(cases)
    else:
        for case in cases:
            print(json.dumps(asdict(case)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
