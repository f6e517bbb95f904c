"""``--backend_cache``: converted models kept between runs, and every fault of the cache a warning, never a
failure (a folder that cannot be written or read, a stale or corrupt entry: converted again); the flags'
refusals; the one line naming the install command when ``openvino`` is missing."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ldm.backends.ir_cache import IRCache, file_record
from ldm.backends.openvino_runtime import CPU_CONFIG
from optimizedSD import optimized_txt2img
from tests.test_cli_errors import expect_usage_error
from tests.test_cli_golden import COMMON, _read, within_tolerance

INSTALL = 'pip install -e ".[openvino]"'


def test_missing_openvino_is_one_line_naming_the_install(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: importing it raises ImportError
    argv = ["--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path), *COMMON, "--backend", "openvino"]
    expect_usage_error(capsys, optimized_txt2img.main, argv, "--backend openvino", INSTALL)
    assert not tmp_path.joinpath("txt2img-samples").exists()


@pytest.mark.parametrize("extra, fragment", [
    (("--backend", "openvino", "--tome", "0.5"), "--tome does not work with --backend openvino"),
    (("--backend", "openvino", "--device", "cuda"), "--backend openvino runs on the CPU"),
    (("--backend_cache", "somewhere"), "--backend_cache goes with --backend openvino"),
])
def test_combinations_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, extra, fragment):
    argv = ["--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path), *COMMON]
    argv = [a for a in argv if a not in ("--device", "cpu")] + list(extra)
    expect_usage_error(capsys, optimized_txt2img.main, argv, fragment)


@pytest.mark.parametrize("extra, chosen, why", [
    ((), "openvino", "openvino (the CPU)"),
    (("--tome", "0.5", "--backend_cache", "somewhere"), "torch", "torch (--tome is given)"),
])
def test_auto_backend_takes_openvino_where_it_runs_the_run(extra, chosen, why, capsys):
    from ldm.pipeline.request import TXT2IMG
    from optimizedSD.arguments import parse_args

    pytest.importorskip("openvino")
    request = parse_args(["--prompt", "x", *COMMON, "--backend", "auto", *extra], TXT2IMG)
    assert request.backend == chosen and f"--backend auto: {why}" in capsys.readouterr().err
    assert (request.backend_cache is None) == (chosen == "torch")  # a cache folder is dropped, not an error


@pytest.mark.parametrize("device, installed, why", [
    ("cuda", True, "the device is cuda"), ("cpu", False, "the openvino package is not installed"),
])
def test_auto_backend_is_torch_elsewhere(device, installed, why, monkeypatch, capsys):
    from argparse import Namespace

    from optimizedSD.flags.backend import auto_backend

    if not installed:
        monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: importing it raises ImportError
    assert auto_backend(Namespace(tome=None, backend_cache="c"), device) == "torch" and why in capsys.readouterr().err


ov = pytest.importorskip("openvino")


def small_model():
    """A converted two-layer network: enough to write, read back and run an IR, in a fraction of a second."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        return ov.convert_model(net, example_input=torch.zeros(2, 6)), net


def save_into(cache: IRCache, key: str, model):
    return cache.store(key, lambda xml: ov.save_model(model, xml, compress_to_fp16=False))


def runs_like(model, net) -> bool:
    x = torch.randn(4, 6)
    out = ov.Core().compile_model(model, "CPU", CPU_CONFIG)(x.numpy())[0]  # fp32: bf16 where the CPU has it
    return np.allclose(out, net(x).detach().numpy(), atol=1e-6)


def test_store_then_load(tmp_path):
    model, net = small_model()
    cache = IRCache(tmp_path / "cache", ov.__version__)
    assert cache.load("k", ov.Core().read_model) is None  # nothing yet
    entry = save_into(cache, "k", model)
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "model.bin", "model.xml"]
    assert [p.name for p in entry.parent.iterdir()] == ["k"]  # no staging folder left behind
    assert runs_like(cache.load("k", ov.Core().read_model), net)


def test_unwritable_folder_is_a_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    cache = IRCache(tmp_path / "file" / "cache", ov.__version__)
    with caplog.at_level(logging.WARNING):
        assert save_into(cache, "k", small_model()[0]) is None
        assert cache.load("k", ov.Core().read_model) is None
    assert "cannot be written" in caplog.text


def break_entry(entry, how: str) -> None:
    if how == "cut short":
        with open(entry / "model.bin", "r+b") as handle:
            handle.truncate(8)
    elif how == "stale":
        record = json.loads((entry / "entry.json").read_text())
        (entry / "entry.json").write_text(json.dumps({**record, "openvino": "2000.0"}))
    elif how == "unreadable record":
        (entry / "entry.json").write_text("{not json")
    elif how == "garbage xml":  # the record made to match, so that OpenVINO's reader is what refuses it
        (entry / "model.xml").write_text("<net><layers><layer id='0' type='Nonsense'/></layers></net>")
        record = json.loads((entry / "entry.json").read_text())
        record["files"]["model.xml"] = file_record(entry / "model.xml")
        (entry / "entry.json").write_text(json.dumps(record))


@pytest.mark.parametrize("how, reason", [("cut short", "corrupt"), ("stale", "stale"),
                                         ("unreadable record", "unreadable"), ("garbage xml", "unreadable")])
def test_bad_entry_is_converted_again(tmp_path, caplog, how, reason):
    model, net = small_model()
    cache = IRCache(tmp_path / "cache", ov.__version__)
    break_entry(save_into(cache, "k", model), how)
    with caplog.at_level(logging.WARNING):
        assert cache.load("k", ov.Core().read_model) is None
    assert reason in caplog.text and "converting again" in caplog.text
    assert not (tmp_path / "cache" / "k").exists()  # removed: the next store replaces it
    save_into(cache, "k", model)
    assert runs_like(cache.load("k", ov.Core().read_model), net)


def test_cli_converts_once_then_reads_the_cache(tiny_checkpoint, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    images = []
    for run in range(3):
        argv = ["--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path / f"run{run}"), *COMMON, "--n_samples", "1",
                "--prompt", "a fox", "--backend", "openvino", "--backend_cache", str(cache)]
        assert optimized_txt2img.main(argv) == 0
        captured = capsys.readouterr()
        assert ("converting the UNet" in captured.out) == (run != 1), captured.out
        images.append([_read(p) for p in sorted((tmp_path / f"run{run}").rglob("seed_*.png"))])
        if run == 1:  # corrupt the entries (the UNet's and the VAE decoder's): the third run warns and converts again
            entries = list(cache.iterdir())
            assert len(entries) == 2
            for entry in entries:
                break_entry(entry, "cut short")
    assert "corrupt (model.bin changed)" in caplog.text  # the CLI prints warnings as one line each
    assert within_tolerance(images[1], images[0]) and within_tolerance(images[2], images[0])
