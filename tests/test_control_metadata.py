"""ControlNet's metadata as the webui ControlNet extension writes it (``ControlNet 0: "Module: canny, Model: NAME
[HASH], Weight: ..."``, HASH the webui's old short model hash: sha256 of the 64 KiB at 1 MiB, 8 hex digits), and
``--from_png`` restoring the ControlNets from ``--control_dir`` with the ``--control_image`` given."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.control.metadata import parse_unit
from optimizedSD import optimized_txt2img
from optimizedSD.infotext import parse_infotext, read_parameters
from tests.control_files import hint_png, random_control_state, save_v11
from tests.test_cli_vs_diffusers import TINY_CONFIG


def webui_short_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("made")
    model = save_v11(random_control_state(TINY_CONFIG), folder / "control_v11p_sd15_canny.pth")
    hint = hint_png(folder / "photo.png")
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir",
            str(folder / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--seed", "21", "--sampler", "euler",
            "--ddim_steps", "5", "--skip_grid", "--no-watermark", "--control_model", str(model), "--control_image",
            str(hint), "--control_preprocess", "canny", "--control_weight", "0.6", "--control_start", "0.2",
            "--control_end", "0.8", "--canny_low", "60"]
    assert optimized_txt2img.main(argv) == 0
    (image,) = (folder / "out").rglob("seed_*.png")
    return {"model": model, "hint": hint, "image": image, "folder": folder}


def test_the_extensions_fields(made):
    fields = parse_infotext(read_parameters(made["image"])).fields
    assert fields["ControlNet 0"] == (
        f"Module: canny, Model: control_v11p_sd15_canny [{webui_short_hash(made['model'])}], Weight: 0.6, "
        "Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 60, Threshold B: 200, "
        "Guidance Start: 0.2, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced")
    assert made["model"].stat().st_size > 0x110000  # the hash reads real bytes of the file


def test_from_png_restores_the_controlnet(made, tiny_checkpoint, tmp_path, capsys):
    library = tmp_path / "ControlNet"
    library.mkdir()
    shutil.copy(made["model"], library / made["model"].name)
    base = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--skip_grid",
            "--no-watermark", "--n_samples", "1", "--from_png", str(made["image"])]
    assert optimized_txt2img.main([*base, "--outdir", str(tmp_path / "again"), "--control_dir", str(library),
                                   "--control_image", str(made["hint"])]) == 0
    (again,) = (tmp_path / "again").rglob("seed_*.png")
    assert "cannot be honoured" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made["image"])))

    assert optimized_txt2img.main([*base, "--outdir", str(tmp_path / "x"), "--control_dir", str(library)]) == 2
    assert "give --control_image once for each" in capsys.readouterr().err
    assert optimized_txt2img.main([*base, "--outdir", str(tmp_path / "y"), "--control_dir", str(tmp_path),
                                   "--control_image", str(made["hint"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "control_v11p_sd15_canny, not found in" in err[0]


def test_reads_what_the_webui_wrote():
    unit = parse_unit(1, "Module: none, Model: control_v11f1p_sd15_depth [cfd03158], Weight: 1, Resize Mode: Crop and "
                         "Resize, Low Vram: False, Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: "
                         "Balanced, Hr Option: Both, Save Detected Map: True")
    assert (unit.module, unit.model_name, unit.model_hash, unit.weight, unit.start, unit.end) == (
        "none", "control_v11f1p_sd15_depth", "cfd03158", 1.0, 0.0, 1.0)
