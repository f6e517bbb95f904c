"""ldm.checkpoints.reader: round trips, the restricted unpickler (payloads must not run), Lightning/numpy
stand-ins, and one-line CheckpointErrors for damaged files.

Every payload below tries to create a marker file; each test asserts the marker is absent afterwards,
and the os.system test also shows that an unrestricted ``torch.load`` of the same file does run it.
"""

from __future__ import annotations

import _codecs
import builtins
import copyreg
import functools
import importlib
import io
import os
import pickle
import random
import subprocess
import sys
import tarfile
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldm.checkpoints.reader as checkpoint_file
from ldm.checkpoints.zip_container import inspect_torch_zip
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.pickle_globals import InertStandIn
from ldm.checkpoints.pickle_limits import PickleLimits
from ldm.checkpoints.reader import read_checkpoint
from ldm.checkpoints.unpickler import RestrictedUnpickler, restricted_pickle_module


# ----------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------


def _weights() -> dict[str, torch.Tensor]:
    """A small state dict in the SD v1 key layout, fp32 + fp16 + bf16 + the int64 EMA counter."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g).half(),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g).to(torch.bfloat16),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model_ema.num_updates": torch.tensor(470000, dtype=torch.int64),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 10, dtype=torch.float64),
    }


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, tensor in expected.items():
        assert type(loaded[key]) is torch.Tensor, key
        assert loaded[key].dtype == tensor.dtype, key
        assert loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key


def _assert_one_line_error(excinfo, path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    return message


def _legacy_file_with_main_pickle(main_pickle: bytes) -> bytes:
    """A legacy (non-zip) torch file whose object pickle is ``main_pickle`` (hand-written opcodes)."""
    header = b"".join(
        pickle.dumps(value, protocol=2)
        for value in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, {"protocol_version": 1001})
    )
    return header + main_pickle + pickle.dumps([], protocol=2)


class _Payload:
    """Pickles as ``func(*args)``: what an attacker's file does with __reduce__."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def marker(tmp_path):
    """A file that a payload would create; tests assert it does not exist."""
    return tmp_path / "pwned"


# ----------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    weights = _weights()
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    loaded = read_checkpoint(path)
    _assert_same(loaded, {k: weights[k] for k in loaded})  # safetensors sorts keys
    assert set(loaded) == set(weights)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_ckpt_round_trip_lightning_layout(tmp_path, zip_format):
    weights = _weights()
    state = dict(weights)
    state["not_a_tensor"] = "dropped"  # non-tensor entries inside the state dict are dropped
    path = tmp_path / "model.ckpt"
    torch.save(
        {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    _assert_same(read_checkpoint(path), weights)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": {"state_dict": sd}, "optimizer": {"lr": 1e-4}},
        lambda sd: {"state_dict": {"state_dict": sd}},
        lambda sd: {"model_state_dict": sd, "step": torch.tensor(3)},
    ],
    ids=["flat", "state_dict", "model.state_dict", "nested_twice", "model_state_dict"],
)
def test_ckpt_finds_nested_state_dict(tmp_path, wrap):
    weights = _weights()
    path = tmp_path / "model.pth"
    torch.save(wrap(dict(weights)), path)
    _assert_same(read_checkpoint(path), weights)


def test_ckpt_parameters_and_tensor_attributes(tmp_path):
    """Parameters (_rebuild_parameter[_with_state]) and tensors with attributes (_rebuild_from_type_v2)."""
    weight = torch.nn.Parameter(torch.randn(4, 4))
    tagged_param = torch.nn.Parameter(torch.randn(3))
    tagged_param.note = "python attribute"
    tagged = torch.randn(5).half()
    tagged.note = "python attribute"
    path = tmp_path / "params.pt"
    torch.save(OrderedDict(w=weight, p=tagged_param, t=tagged), path)
    loaded = read_checkpoint(path)
    assert list(loaded) == ["w", "p", "t"]
    assert all(type(value) is torch.Tensor and not value.requires_grad for value in loaded.values())
    assert torch.equal(loaded["w"], weight.detach())
    assert torch.equal(loaded["p"], tagged_param.detach())
    assert loaded["t"].dtype == torch.float16 and torch.equal(loaded["t"], tagged)


@pytest.mark.parametrize("content", ["safetensors", "zip", "legacy"])
def test_format_is_read_from_content_for_other_extensions(tmp_path, content):
    weights = _weights()
    path = tmp_path / "model.bin"
    if content == "safetensors":
        save_file(weights, str(path))
    else:
        torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=content == "zip")
    loaded = read_checkpoint(path)
    _assert_same(loaded, {k: weights[k] for k in loaded})
    assert set(loaded) == set(weights)


def test_zip_is_memory_mapped_and_legacy_is_not(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for zip_format in (True, False):
        path = tmp_path / f"m{zip_format}.ckpt"
        torch.save({"state_dict": _weights()}, path, _use_new_zipfile_serialization=zip_format)
        read_checkpoint(path)
    assert [c["mmap"] for c in calls] == [True, False]
    assert all(c["pickle_module"].Unpickler.__mro__[1] is RestrictedUnpickler for c in calls)
    assert all(c["weights_only"] is False for c in calls)


# ----------------------------------------------------------------------------------------------------
# security: payloads are refused and never run
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_os_system_payload_is_refused_and_does_not_run(tmp_path, marker, zip_format):
    path = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": _weights(), "evil": _Payload(os.system, f"touch {marker}")},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    message = _assert_one_line_error(excinfo, path)
    assert f"it references {os.system.__module__}.system, which could run code" in message
    assert message.startswith("refusing to load")
    assert not marker.exists()
    # The payload is live: an unrestricted load runs it. This is what the test guards against.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_exec_payload_is_refused_and_does_not_run(tmp_path, marker):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _weights(), "evil": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")}, path)
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    assert "builtins.exec" in _assert_one_line_error(excinfo, path)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_payload_hidden_deep_inside_the_state_dict_is_refused(tmp_path, marker, zip_format):
    state = dict(_weights())
    state["meta"] = {"history": [1, 2, {"inner": (_Payload(os.system, f"touch {marker}"),)}]}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"system, which could run code"):
        read_checkpoint(path)
    assert not marker.exists()


def test_payload_in_the_header_of_a_legacy_file_is_refused(tmp_path, marker):
    """torch's legacy reader calls pickle_module.load() on the header records: that must be restricted too."""
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2) + b"\x00" * 64)
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    assert f"{os.system.__module__}.system" in _assert_one_line_error(excinfo, path)
    assert not marker.exists()


def _script(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


@pytest.mark.parametrize(
    ("make_payload", "refused"),
    [
        (lambda m: _Payload(builtins.eval, _script(m).replace("open(", "__import__('builtins').open(")), "builtins.eval"),
        (lambda m: _Payload(builtins.getattr, "x", "upper"), "builtins.getattr"),
        (lambda m: _Payload(builtins.__import__, "os"), "builtins.__import__"),
        (lambda m: _Payload(functools.partial(os.system, f"touch {m}")), "functools.partial"),
        (lambda m: _Payload(subprocess.check_call, ["touch", str(m)]), "subprocess.check_call"),
        (lambda m: _Payload(importlib.import_module, "antigravity"), "importlib.import_module"),
        (lambda m: _Payload(torch.load, "/dev/null"), "torch.serialization.load"),
        (lambda m: _Payload(copyreg._reconstructor, object, object, None), "copyreg._reconstructor"),
        (
            lambda m: _Payload(
                torch.storage._load_from_bytes, _pickled_bytes_running(f"touch {m}")
            ),  # would run an unrestricted torch.load
            "torch.storage._load_from_bytes",
        ),
    ],
    ids=["eval", "getattr", "__import__", "partial", "subprocess", "importlib", "torch.load", "reconstructor", "load_from_bytes"],
)
def test_other_dangerous_globals_are_refused(tmp_path, marker, make_payload, refused):
    path = tmp_path / "model.ckpt"
    payload = make_payload(marker)
    if isinstance(payload.func, functools.partial):  # pickle the partial itself
        payload = payload.func
    torch.save({"state_dict": _weights(), "x": payload}, path)
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    assert f"references {refused}," in _assert_one_line_error(excinfo, path)
    assert not marker.exists()


def _pickled_bytes_running(command: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(os.system, command), buffer)
    return buffer.getvalue()


def test_tensor_class_with_raw_address_is_not_reachable(tmp_path):
    """NEWOBJ_EX(torch.Tensor, cdata=0) makes a tensor from a raw pointer (a segfault); it must be an error."""
    raw = b"\x80\x04\x8c\x05torch\x94\x8c\x06Tensor\x94\x93)}\x8c\x05cdata\x94K\x00s\x92."
    path = tmp_path / "model.ckpt"
    path.write_bytes(_legacy_file_with_main_pickle(raw))
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _weights(), "x": _Payload(_codecs.encode, "x", "rot13")}, path)
    with pytest.raises(CheckpointError, match="latin-1"):
        read_checkpoint(path)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript") as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


def test_pre_1_0_tar_format_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as archive:
        for name in ("storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(CheckpointError, match="tar format") as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


# ----------------------------------------------------------------------------------------------------
# Lightning callbacks and numpy scalars, as real SD v1 files have them
# ----------------------------------------------------------------------------------------------------


def _install_fake_module(monkeypatch, dotted: str, **attributes) -> types.ModuleType:
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name not in sys.modules or not isinstance(sys.modules[name], types.ModuleType) or depth == len(parts):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[dotted]
    for key, value in attributes.items():
        if isinstance(value, type) or callable(value):
            value.__module__ = dotted
            value.__qualname__ = key
        setattr(module, key, value)
    return module


def _booby_trapped_model_checkpoint(marker):
    class ModelCheckpoint:
        """Like Lightning's: pickled by class (as a dict key) and as an instance; its code must never run."""

        def __init__(self, **state):
            self.__dict__.update(state)

        def __setstate__(self, state):  # called by an ordinary unpickler
            marker.touch()

    return ModelCheckpoint


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
@pytest.mark.parametrize("keep_module_while_loading", [False, True], ids=["not_importable", "importable_but_unused"])
def test_lightning_callbacks_load_as_inert_stand_ins(tmp_path, monkeypatch, marker, package, keep_module_while_loading):
    weights = _weights()
    dotted = f"{package}.callbacks.model_checkpoint"
    model_checkpoint = _booby_trapped_model_checkpoint(marker)
    with monkeypatch.context() as saving:
        _install_fake_module(saving, dotted, ModelCheckpoint=model_checkpoint)
        callback_state = {
            "monitor": None,
            "best_model_score": np.float64(0.1234),  # numpy 2 pickles numpy._core.multiarray.scalar
            "current_score": np.array([0.5, 0.25], dtype=np.float32),  # _reconstruct + ndarray + dtype
            "best_model_path": "/fsx/logs/last.ckpt",
            "kth_best": {np.float32(1.5), b"bytes"},
        }
        checkpoint = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": weights,
            "callbacks": {model_checkpoint: callback_state},
            "loops": model_checkpoint(dirpath="/fsx/logs", save_top_k=-1),
        }
        path = tmp_path / "sd-v1-x.ckpt"
        torch.save(checkpoint, path)
        if keep_module_while_loading:
            _assert_same(read_checkpoint(path), weights)
    if not keep_module_while_loading:
        for name in (package.split(".")[0], package, dotted):
            monkeypatch.setitem(sys.modules, name, None)  # import now fails even if Lightning is installed
        with pytest.raises(ImportError):
            importlib.import_module(dotted)
        _assert_same(read_checkpoint(path), weights)
        # What the stand-ins are for: torch's own safe mode refuses the file.
        with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):
            torch.load(path, weights_only=True)
    assert not marker.exists()


def test_numpy_1_spelling_of_scalars_loads(tmp_path, monkeypatch, marker):
    """Files written under numpy 1 name numpy.core.multiarray.scalar; it is a stand-in, never numpy's."""

    def scalar(dtype, data):  # what an unrestricted load would call
        marker.touch()

    weights = _weights()
    path = tmp_path / "model.ckpt"
    with monkeypatch.context() as saving:
        _install_fake_module(saving, "numpy.core.multiarray", scalar=scalar)
        torch.save({"state_dict": weights, "callbacks": {"best": _Payload(scalar, np.dtype("float64"), b"\0" * 8)}}, path)
    _assert_same(read_checkpoint(path), weights)
    assert not marker.exists()


def test_numpy_ndarray_is_not_handed_out(tmp_path):
    """numpy.ndarray(shape, dtype=object, buffer=...) reads object pointers from raw bytes: only a stand-in."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _weights(), "x": _Payload(np.ndarray, (1,), np.dtype(object), bytearray(b"\x41" * 8))}, path)
    # Loads (the entry is dropped), and the object array was never built.
    module = restricted_pickle_module(PickleLimits(
        record_sizes=inspect_torch_zip(path, path.stat().st_size).storage_sizes))
    unpickled = torch.load(path, pickle_module=module, weights_only=False)
    assert isinstance(unpickled["x"], InertStandIn)
    assert "numpy.ndarray" in repr(unpickled["x"])
    assert set(read_checkpoint(path)) == set(_weights())


# ----------------------------------------------------------------------------------------------------
# damaged, empty, missing and tensor-less files
# ----------------------------------------------------------------------------------------------------


def _write_case(case: str, tmp_path):
    weights = _weights()
    if case == "missing":
        return tmp_path / "nope.ckpt"
    if case == "directory":
        (tmp_path / "dir.ckpt").mkdir()
        return tmp_path / "dir.ckpt"
    if case == "empty_ckpt":
        path = tmp_path / "empty.ckpt"
        path.write_bytes(b"")
        return path
    if case == "empty_safetensors":
        path = tmp_path / "empty.safetensors"
        path.write_bytes(b"")
        return path
    if case == "random_bytes":
        path = tmp_path / "random.ckpt"
        path.write_bytes(random.Random(0).randbytes(4096))
        return path
    if case == "text_unknown_extension":
        path = tmp_path / "notes.txt"
        path.write_text("hello, I am not a checkpoint\n")
        return path
    if case in ("truncated_zip", "truncated_legacy", "truncated_safetensors"):
        path = tmp_path / ("cut.safetensors" if case == "truncated_safetensors" else "cut.ckpt")
        if case == "truncated_safetensors":
            save_file(weights, str(path))
        else:
            torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=case == "truncated_zip")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 5])
        return path
    if case == "zip_with_corrupt_body":
        path = tmp_path / "corrupt.ckpt"
        torch.save({"state_dict": weights}, path)
        data = bytearray(path.read_bytes())
        data[40:4000] = random.Random(1).randbytes(3960)
        path.write_bytes(bytes(data))
        return path
    if case == "garbage_named_safetensors":
        path = tmp_path / "model.safetensors"
        path.write_bytes(random.Random(2).randbytes(1000))
        return path
    if case == "pickle_named_safetensors":
        path = tmp_path / "model.safetensors"
        torch.save({"state_dict": weights}, path)
        return path
    if case == "no_tensors_ckpt":
        path = tmp_path / "hparams.ckpt"
        torch.save({"epoch": 3, "state_dict": {}, "hyper_parameters": {"lr": 1e-4}}, path)
        return path
    if case == "no_tensors_safetensors":
        path = tmp_path / "empty_dict.safetensors"
        save_file({}, str(path), metadata={"format": "pt"})
        return path
    if case == "list_not_dict":
        path = tmp_path / "list.pt"
        torch.save([torch.zeros(2)], path)
        return path
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "not found"),
        ("directory", "directory"),
        ("empty_ckpt", "empty"),
        ("empty_safetensors", "empty"),
        ("random_bytes", "not a checkpoint"),
        ("text_unknown_extension", "not a checkpoint"),
        ("truncated_zip", "damaged or truncated"),
        ("truncated_legacy", "damaged or truncated"),
        ("truncated_safetensors", "damaged safetensors"),
        ("zip_with_corrupt_body", "damaged or truncated"),
        ("garbage_named_safetensors", "named .safetensors"),
        ("pickle_named_safetensors", "named .safetensors but holds a PyTorch zip checkpoint"),
        ("no_tensors_ckpt", "contains no tensors"),
        ("no_tensors_safetensors", "contains no tensors"),
        ("list_not_dict", "not a dict of tensors"),
    ],
)
def test_bad_files_give_a_one_line_checkpoint_error(tmp_path, case, expected):
    path = _write_case(case, tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    message = _assert_one_line_error(excinfo, path)
    assert expected in message


def test_forced_weights_only_env_gives_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _weights()}, path)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD") as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


# ----------------------------------------------------------------------------------------------------
# legitimate files the hardened reader must still load, and what it reads them through
# ----------------------------------------------------------------------------------------------------


def test_compressed_zip_records_load_without_mmap_and_equal(tmp_path, monkeypatch):
    """A re-zipped (deflated) torch file: mmap would read compressed bytes as floats; ours inflates them."""
    import zipfile

    weights = _weights()
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": weights}, plain)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k["mmap"]) or real_load(*a, **k))
    _assert_same(read_checkpoint(deflated), weights)
    assert calls == [False]


def test_outer_tensors_win_over_a_nested_state_dict(tmp_path):
    outer = _weights()
    inner = {key: torch.zeros_like(value) for key, value in outer.items()}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**outer, "state_dict": inner}}, path)
    _assert_same(read_checkpoint(path), outer)


def test_dict_attributes_from_the_file_are_never_called(tmp_path):
    """An OrderedDict whose pickled state sets ``get``/``items``: read through dict's own methods."""
    class DictWithAttributes:  # pickles as OrderedDict() + its items + BUILD {"get": ..., "items": ...}
        def __init__(self, pairs, **attributes):
            self.pairs, self.attributes = pairs, attributes

        def __reduce__(self):
            return OrderedDict, (), self.attributes, None, iter(self.pairs.items())

    state = DictWithAttributes(_weights(), get="not callable", items="not callable either", values=None)
    path = tmp_path / "model.ckpt"
    torch.save(DictWithAttributes({"state_dict": state}, get="shadowed"), path)
    assert torch.load(path, weights_only=False).get == "shadowed"  # what a plain load would hand us
    _assert_same(read_checkpoint(path), _weights())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float64])
def test_floating_weights_of_any_width_pass_the_checks(tmp_path, dtype):
    weights = {"w": torch.randn(4, 4).to(dtype), "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    assert read_checkpoint(path)["w"].dtype == dtype


def test_unread_schedule_buffers_may_hold_inf(tmp_path):
    """CompVis' lvlb_weights / posterior buffers are never read; an inf there is not a damaged file."""
    weights = _weights()
    weights["lvlb_weights"] = torch.tensor([float("inf"), 1.0])
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights}, path)
    assert torch.isinf(read_checkpoint(path)["lvlb_weights"][0])


def test_a_crc_mismatch_is_a_damaged_file(tmp_path):
    import struct
    import zipfile

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256)}}, path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_length + extra_length + 100] ^= 0x01
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"].shape == (256,)  # torch itself does not notice
    with pytest.raises(CheckpointError, match=r"damaged or truncated \(record .*Bad CRC-32") as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


def test_messages_escape_names_and_keep_one_line():
    from ldm.messages import escaped, one_line

    assert escaped("a\nb\x1b[2J\u202e") == "a\\nb\\x1b[2J\\u202e"
    assert one_line("\n  first line\nsecond") == "first line"
    long = one_line("cannot read x: " + "k" * 1000 + " does --config match?")
    assert len(long) == 400 and long.startswith("cannot read x: ") and long.endswith("does --config match?")
    assert str(CheckpointError("two\nlines")) == "two"


def test_read_torch_data_returns_nested_data_with_module_containers_as_stand_ins(tmp_path, marker):
    """Textual-inversion files: nested dicts, ints and a ParameterDict (torch 1.11-1.12 saves), no code run."""
    vectors = torch.randn(2, 8)
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "name": "cat",
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})}, path)
    data = checkpoint_file.read_torch_data(path)
    assert data["name"] == "cat" and int(data["string_to_token"]["*"]) == 265
    holder = data["string_to_param"]
    assert isinstance(holder, InertStandIn)
    assert torch.equal(holder._stand_in_state["_parameters"]["*"].detach(), vectors)
    evil = tmp_path / "evil.pt"
    torch.save({"name": "x", "p": _Payload(os.system, f"touch {marker}")}, evil)
    with pytest.raises(CheckpointError, match="which could run code"):
        checkpoint_file.read_torch_data(evil)
    assert not marker.exists()


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("RssFile:")).split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; madvise is Linux-only")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_the_weight_check_leaves_no_file_pages_behind(tmp_path, suffix):
    """The check reads every value of a mapped file; it gives each tensor's pages back, so reading a checkpoint
    does not hold the file in memory (``--quantize int8`` reads each fp32 layer once more, into int8)."""
    from ldm.loading.random_weights import save_checkpoint

    weights = {f"w{i}": torch.randn(1024, 4096) for i in range(4)}  # 64 MiB
    path = save_checkpoint(weights, tmp_path / f"big{suffix}")
    before = _rss_file_bytes()
    state = read_checkpoint(path)
    grown = _rss_file_bytes() - before
    assert grown < 8 * 2**20, grown / 2**20
    assert all(torch.equal(state[name], weights[name]) for name in weights)  # and they read as they were
