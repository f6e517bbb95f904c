"""ControlNet files in every layout people have read to the same network; everything else refused in one line.

The oracle for the diffusers layout is diffusers itself: a v1.1 file converted by diffusers' own
``convert_controlnet_checkpoint`` and saved by ``ControlNetModel.save_pretrained`` must read back to the very
tensors of the v1.1 file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.control.errors import ControlFileError
from ldm.control.files import DIFFUSERS, V10, V11, load_control_net, read_control_weights
from ldm.control.units import control_config
from ldm.loading.random_weights import random_state_dict
from ldm.config import load_model_config
from optimizedSD import optimized_txt2img
from tests.checkpoint_variants import kohya_lora
from tests.control_files import diffusers_controlnet, hint_png, random_control_state, save_v10, save_v11
from tests.test_cli_vs_diffusers import TINY_CONFIG


@pytest.fixture(scope="module")
def state():
    return random_control_state(TINY_CONFIG)


def assert_same(read: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype=None) -> None:
    assert set(read) == set(expected)
    for key, value in expected.items():
        want = value.to(dtype) if dtype is not None else value
        assert read[key].dtype == want.dtype and torch.equal(read[key], want), key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_v11_file(tmp_path, state, suffix):
    read, layout = read_control_weights(save_v11(state, tmp_path / f"control_v11p_sd15_x{suffix}"))
    assert layout == V11
    assert_same(read, state)


@pytest.mark.parametrize("with_base", [False, True], ids=["alone", "with-base-model"])
def test_v10_file(tmp_path, state, with_base):
    base = random_state_dict(load_model_config(TINY_CONFIG), seed=1) if with_base else None
    read, layout = read_control_weights(save_v10(state, tmp_path / "control_sd15_x.pth", base))
    assert layout == V10
    assert_same(read, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, state, dtype):
    half = {k: v.to(dtype) for k, v in state.items()}
    read, _ = read_control_weights(save_v11(half, tmp_path / "control_half.safetensors"))
    assert_same(read, half)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_folder_reads_back_the_v11_tensors(tmp_path, state, variant):
    model = diffusers_controlnet(state, TINY_CONFIG)
    folder = tmp_path / "controlnet"
    model.save_pretrained(folder, variant=variant, safe_serialization=True)
    read, layout = read_control_weights(folder)
    assert layout == DIFFUSERS
    assert_same(read, state, torch.float32)
    weights = next(folder.glob("*.safetensors"))
    alone, layout = read_control_weights(weights)  # the weights file without its folder
    assert layout == DIFFUSERS
    assert_same(alone, state, torch.float32)


def refused_files(tmp_path: Path, state) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    def save(name: str, tensors: dict) -> Path:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
        return tmp_path / name

    sdxl = dict(state, **{"label_emb.0.0.weight": torch.zeros(4, 4)})
    sd2 = dict(state, **{"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 1024)})
    t2i = {"conv_in.weight": torch.zeros(4, 3, 3, 3), "body.0.block1.weight": torch.zeros(4, 4, 3, 3)}
    whole = save_v11(state, tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    checkpoint = random_state_dict(load_model_config(TINY_CONFIG))
    wider = random_control_state(TINY_CONFIG)
    wider["input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    return {
        "sdxl": (save("sdxl.safetensors", sdxl), "SDXL ControlNet"),
        "sd2": (save("sd2.safetensors", sd2), "SD 2.x ControlNet"),
        "t2i": (save("t2iadapter.safetensors", t2i), "T2I-Adapter"),
        "checkpoint": (save("model.safetensors", checkpoint), "SD v1 checkpoint, not a ControlNet (pass it with --ckpt)"),
        "lora": (save("lora.safetensors", kohya_lora()), "a LoRA, not a ControlNet"),
        "truncated": (tmp_path / "truncated.safetensors", "truncated.safetensors"),
        "other-architecture": (save("wider.safetensors", wider), "not a ControlNet of this model's UNet"),
    }


KINDS = ["sdxl", "sd2", "t2i", "checkpoint", "lora", "truncated", "other-architecture"]


@pytest.mark.parametrize("kind", KINDS)
def test_refused_in_one_line(tmp_path, state, tiny_checkpoint, capsys, kind):
    path, fragment = refused_files(tmp_path, state)[kind]
    with pytest.raises(ControlFileError):
        load_control_net(path, control_config(load_model_config(TINY_CONFIG)), torch.float32)
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir",
            str(tmp_path / "out"), "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--sampler", "ddim",
            "--control_model", str(path), "--control_image", str(hint_png(tmp_path / "hint.png"))]
    assert optimized_txt2img.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert fragment in err[0] and str(path) in err[0], err[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--control_image", "IMAGE"], "give one --control_image for each --control_model: 2 models, 1 images"),
    (["--control_image", "missing.png", "--control_image", "IMAGE"], "--control_image: image not found: missing.png"),
    (["--control_image", "IMAGE", "--control_image", "IMAGE", "--control_start", "0.5", "--control_end", "0.5"],
     "start < end"),
    (["--control_image", "IMAGE", "--control_image", "IMAGE", "--control_weight", "1", "--control_weight", "1",
      "--control_weight", "1"], "--control_weight given 3 times for 2 --control_model"),
    (["--control_image", "IMAGE", "--control_image", "IMAGE", "--hires_scale", "2"], "with the hires fix"),
])
def test_flag_mistakes_in_one_line(tmp_path, state, tiny_checkpoint, capsys, extra, fragment):
    model = str(save_v11(state, tmp_path / "control.safetensors"))
    image = str(hint_png(tmp_path / "hint.png"))
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir",
            str(tmp_path / "out"), "--H", "64", "--W", "64", "--n_samples", "1", "--control_model", model,
            "--control_model", model, *[image if a == "IMAGE" else a for a in extra]]
    assert optimized_txt2img.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
