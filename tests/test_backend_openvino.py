"""``--backend openvino``: the UNet converted with ``openvino.convert_model`` and compiled for the CPU in fp32
gives the PyTorch backend's images.

References and tolerances: the golden cases of ``test_cli_golden.py`` (several samplers, guidance and
``--scale 1``, a negative prompt, ``--unet_bs 1``, img2img) run with ``--backend openvino`` must stay within
that file's tolerance of the pinned PyTorch images (no value more than 1 level of 255 away, at most 0.1 % of
the values different); 9-channel inpainting and a merged LoRA are compared with the PyTorch backend's own run
under the same tolerance. The UNet alone, on several shapes (batch, size, context length, 9 channels), equals
PyTorch's within 1e-5 of the output's scale (fp32 rounding: measured ~5e-8 on the tiny UNet, 6e-6 on SD v1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from ldm.backends.ir_cache import IRCache  # noqa: E402
from ldm.backends.openvino_runtime import openvino_version  # noqa: E402
from ldm.backends.unet_engine import openvino_unet  # noqa: E402
from ldm.config import load_model_config  # noqa: E402
from ldm.loading.random_weights import random_state_dict, save_checkpoint  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402
from optimizedSD import optimized_inpaint, optimized_txt2img  # noqa: E402
from tests import lora_files  # noqa: E402
from tests.conftest import TINY_CONFIG  # noqa: E402
from tests.test_cli_golden import GOLDEN, _read, differences, run_case, within_tolerance  # noqa: E402
from tests.test_cli_vs_diffusers import diffusers_pipeline_from_checkpoint  # noqa: E402
from tests.test_inpainting_vs_diffusers import tiny_inpainting_config, write_test_images  # noqa: E402

GOLDEN_CASES = ("txt2img_plms_default", "txt2img_euler_a_negative", "txt2img_heun_low_unet_bs",
                "txt2img_lms_scale1_medium", "img2img_ddim")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One converted-model cache for the module: each checkpoint (and LoRA) is converted once."""
    return tmp_path_factory.mktemp("openvino_cache")


def openvino_argv(cache: Path) -> tuple[str, ...]:
    return ("--backend", "openvino", "--backend_cache", str(cache))


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_cases_within_tolerance(name, tiny_checkpoint, tmp_path, cache):
    images = run_case(name, tiny_checkpoint, tmp_path, openvino_argv(cache))
    golden = [_read(path) for path in sorted((GOLDEN / name).glob("*.png"))]
    assert within_tolerance(images, golden), differences(images, golden)


def unet_and_inputs(config_path: Path, shapes, seed: int = 3):
    config = load_model_config(config_path).unet
    torch.manual_seed(seed)
    unet = UNetModel(config).eval()
    with torch.no_grad():
        for tensor in unet.parameters():
            tensor.normal_(0, 0.05)
    g = torch.Generator().manual_seed(seed)
    inputs = [(torch.randn(b, config.in_channels, h, w, generator=g), torch.rand(b, generator=g) * 999,
               torch.randn(b, length, config.context_dim, generator=g)) for b, h, w, length in shapes]
    return unet, config, inputs


def test_unet_equals_pytorch_on_several_shapes(tmp_path):
    unet, config, inputs = unet_and_inputs(TINY_CONFIG, [(2, 8, 8, 77), (3, 16, 8, 154), (1, 8, 16, 77), (2, 8, 8, 77)])
    with torch.no_grad():
        expected = [unet(*args) for args in inputs]
    engine = openvino_unet(unet, config, "k", IRCache(tmp_path / "cache", openvino_version()))
    assert unet.input_blocks[0][0].weight.numel() == 0  # the PyTorch weights were given back
    for args, reference in zip(inputs, expected):
        eps = engine(*args)
        assert eps.shape == reference.shape and eps.dtype == reference.dtype
        assert (eps - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert len(engine.compiled) == 2  # three shapes met, the last two kept


def pixels(folder: Path) -> list[np.ndarray]:
    return [_read(path) for path in sorted(p for p in folder.rglob("seed_*") if p.is_file())]


def test_nine_channel_inpainting_equals_torch_backend(tmp_path, cache):
    nine_config = tiny_inpainting_config(tmp_path)
    ckpt = save_checkpoint(random_state_dict(load_model_config(nine_config), seed=2025), tmp_path / "inpainting.ckpt")
    init, mask = write_test_images(tmp_path)
    common = ["--ckpt", str(ckpt), "--config", str(nine_config), "--device", "cpu", "--init-img", str(init),
              "--mask", str(mask), "--prompt", "a red sofa", "--no-watermark", "--skip_grid", "--n_samples", "1",
              "--seed", "11", "--sampler", "euler_a", "--ddim_steps", "3"]
    assert optimized_inpaint.main([*common, "--outdir", str(tmp_path / "torch")]) == 0
    assert optimized_inpaint.main([*common, "--outdir", str(tmp_path / "ov"), *openvino_argv(cache)]) == 0
    torch_images, ov_images = pixels(tmp_path / "torch"), pixels(tmp_path / "ov")
    assert within_tolerance(ov_images, torch_images), differences(ov_images, torch_images)


def test_lora_is_merged_before_conversion(tmp_path, cache, capsys):
    state = random_state_dict(load_model_config(TINY_CONFIG), seed=2024)
    ckpt = save_checkpoint(state, tmp_path / "random.safetensors")
    unet_layers = lora_files.layers(diffusers_pipeline_from_checkpoint(state, TINY_CONFIG).unet)
    lora = lora_files.save(lora_files.kohya_lora(unet_layers, [], seed=5), tmp_path / "style.safetensors")
    common = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--H", "64", "--W", "64",
              "--n_samples", "1", "--seed", "7", "--sampler", "dpm_solver", "--ddim_steps", "3", "--prompt", "a fox",
              "--no-watermark", "--skip_grid"]
    runs = {}
    for name, extra in (("plain", ()), ("torch", ("--lora", f"{lora}:0.8")),
                        ("ov", ("--lora", f"{lora}:0.8", *openvino_argv(cache)))):
        assert optimized_txt2img.main([*common, "--outdir", str(tmp_path / name), *extra]) == 0
        runs[name] = pixels(tmp_path / name)
    assert "converting the UNet" in capsys.readouterr().out  # a LoRA is another key: converted anew
    assert within_tolerance(runs["ov"], runs["torch"]), differences(runs["ov"], runs["torch"])
    assert not within_tolerance(runs["plain"], runs["torch"])  # the LoRA changes the image at all


def test_quantized_unet_equals_torch_backend(tiny_checkpoint, tmp_path, cache):
    """``--quantize int8`` is converted as it runs in PyTorch: int8 weights times their scales, fp32 activations
    (OpenVINO's dynamic quantization of activations is switched off: with it 30 % of the values move)."""
    torch_images = run_case("txt2img_plms_default", tiny_checkpoint, tmp_path / "torch", ("--quantize", "int8"))
    ov_images = run_case("txt2img_plms_default", tiny_checkpoint, tmp_path / "ov",
                         ("--quantize", "int8", *openvino_argv(cache)))
    assert within_tolerance(ov_images, torch_images), differences(ov_images, torch_images)


@pytest.mark.parametrize("extra, unet_latents, decoded", [
    (("--n_samples", "2"), ["(4, 4, 8, 8)"], "(1, 4, 8, 8)"),
    # hires fix: the first pass at 64 px, then 128 px; a negative prompt of two chunks pads both to 154 tokens
    (("--n_samples", "1", "--hires_scale", "2", "--negative_prompt", "blurry, " * 60), ["(2, 4, 8, 8)", "(2, 4, 16, 16)"],
     "(1, 4, 16, 16)"),
])
def test_a_cache_hit_compiles_the_first_shape_while_the_checkpoint_loads(extra, unet_latents, decoded, tiny_checkpoint,
                                                                         tmp_path, caplog):
    """The second run finds the converted UNet before the checkpoint is read: it compiles the first call's shapes
    ahead (the right ones: nothing is dropped) and each later shape once, skips the UNet's weights, decodes with
    the cached VAE decoder, and gives the first run's images."""
    common = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--H", "64", "--W", "64",
              "--seed", "5", "--sampler", "ddim", "--ddim_steps", "2", "--prompt", "a fox", "--no-watermark",
              "--skip_grid", *extra, *openvino_argv(tmp_path / "cache")]
    caplog.set_level("INFO", logger="ldm")
    assert optimized_txt2img.main([*common, "--outdir", str(tmp_path / "first")]) == 0
    assert "PyTorch weights given back" in caplog.text  # the miss: loaded, converted, then released
    caplog.clear()
    assert optimized_txt2img.main([*common, "--outdir", str(tmp_path / "second")]) == 0
    messages = [record.getMessage() for record in caplog.records]
    unets = [m for m in messages if m.startswith("compiled the OpenVINO UNet")]
    assert [latents in m for m, latents in zip(unets, unet_latents)] == [True] * len(unet_latents) == [True] * len(unets)
    decoders = [m for m in messages if m.startswith("compiled the OpenVINO VAE decoder")]
    assert len(decoders) == 1 and decoded in decoders[0], decoders  # every image decoded by it
    assert not any("was not the run's first shape" in m for m in messages), messages
    assert "PyTorch weights given back" not in caplog.text and "converted the VAE decoder" not in caplog.text
    first, second = pixels(tmp_path / "first"), pixels(tmp_path / "second")
    assert len(first) == int(extra[1]) and within_tolerance(second, first), differences(second, first)


def test_loading_without_the_unets_weights_still_checks_its_keys(tiny_checkpoint, tmp_path):
    from ldm.checkpoints.errors import CheckpointError
    from ldm.checkpoints.reader import read_checkpoint
    from ldm.loading.stable_diffusion import load_stable_diffusion

    sd = load_stable_diffusion(tiny_checkpoint, TINY_CONFIG, unet_weights=False)
    assert all(p.numel() == 0 for p in sd.unet.parameters()) and not any(p.is_meta for p in sd.unet.parameters())
    assert all(p.numel() > 0 for p in sd.vae.parameters())
    state = dict(read_checkpoint(tiny_checkpoint))
    del state["model.diffusion_model.out.2.weight"]
    broken = save_checkpoint(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 UNet keys"):
        load_stable_diffusion(broken, TINY_CONFIG, unet_weights=False)


def test_shapes_compiled_ahead_that_no_call_needs_are_dropped(tmp_path):
    unet, config, inputs = unet_and_inputs(TINY_CONFIG, [(2, 8, 8, 154)])
    with torch.no_grad():
        expected = unet(*inputs[0])
    engine = openvino_unet(unet, config, "k", IRCache(tmp_path / "cache", openvino_version()))
    engine.compile_ahead(((2, 4, 8, 8), (2,), (2, 77, config.context_dim)))  # a guess: prompts of 75 tokens
    eps = engine(*inputs[0])  # a long prompt: 154 tokens
    assert (eps - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not engine.ahead and list(engine.compiled) == [((2, 4, 8, 8), (2,), (2, 154, config.context_dim))]


@pytest.mark.parametrize("half_name, shapes", [
    ("DECODER", ((1, 4, 8, 8), (1, 4, 16, 8), (1, 4, 8, 8))),
    ("ENCODER", ((1, 3, 64, 64), (1, 3, 128, 64), (1, 3, 64, 64))),
])
def test_vae_halves_equal_pytorch_and_are_kept_in_the_cache(half_name, shapes, tmp_path, caplog):
    from ldm.backends import vae_engine
    from ldm.models.autoencoder import AutoencoderKL

    half = getattr(vae_engine, half_name)
    torch.manual_seed(4)
    vae = AutoencoderKL(load_model_config(TINY_CONFIG).vae).eval()
    with torch.no_grad():
        for tensor in vae.parameters():
            tensor.normal_(0, 0.05)
    cache = IRCache(tmp_path / "cache", openvino_version())
    caplog.set_level("INFO", logger="ldm")
    engine = vae_engine.openvino_half(vae, half, "k", cache)
    assert f"converted the {half.name}" in caplog.text
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = getattr(vae, half.method)(x)
        got = engine(x)
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    caplog.clear()
    assert vae_engine.openvino_half(vae, half, "k", cache) is not None and "converted the" not in caplog.text


def test_the_halves_keys_hash_their_own_weights():
    from ldm.backends.vae_engine import DECODER, ENCODER, half_key
    from ldm.models.autoencoder import AutoencoderKL

    config = load_model_config(TINY_CONFIG).vae
    vae = AutoencoderKL(config)
    keys = {half: half_key(vae, half, config, "v") for half in (DECODER, ENCODER)}
    assert keys[DECODER] != keys[ENCODER]
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1)
    assert half_key(vae, DECODER, config, "v") == keys[DECODER] and half_key(vae, ENCODER, config, "v") != keys[ENCODER]


def test_img2img_inpainting_and_a_pixel_hires_fix_encode_with_openvino(tiny_checkpoint, tmp_path, cache, caplog):
    """Each run that encodes images does so with the cached OpenVINO encoder (and decodes with its decoder, the
    hires fix's first pass too), and gives the PyTorch backend's images."""
    from optimizedSD import optimized_img2img

    init, mask = write_test_images(tmp_path)
    common = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--n_samples", "1",
              "--seed", "21", "--ddim_steps", "3", "--prompt", "a fox", "--no-watermark", "--skip_grid"]
    runs = {
        "img2img": (optimized_img2img, ["--init-img", str(init), "--strength", "0.6", "--sampler", "euler"], 1),
        "inpaint": (optimized_inpaint, ["--init-img", str(init), "--mask", str(mask), "--sampler", "ddim"], 1),
        "hires": (optimized_txt2img, ["--H", "64", "--W", "64", "--sampler", "ddim", "--hires_scale", "2",
                                      "--hires_upscaler", "lanczos"], 1),
    }
    caplog.set_level("INFO", logger="ldm")
    for name, (script, extra, encodes) in runs.items():
        assert script.main([*common, *extra, "--outdir", str(tmp_path / name / "torch")]) == 0
        caplog.clear()
        assert script.main([*common, *extra, "--outdir", str(tmp_path / name / "ov"),
                            *openvino_argv(cache)]) == 0
        messages = [record.getMessage() for record in caplog.records]
        assert len([m for m in messages if m.startswith("compiled the OpenVINO VAE encoder")]) == encodes, messages
        decoders = [m for m in messages if m.startswith("compiled the OpenVINO VAE decoder")]
        assert len(decoders) == (2 if name == "hires" else 1), messages  # hires: the first pass's size, the final
        torch_images, ov_images = pixels(tmp_path / name / "torch"), pixels(tmp_path / name / "ov")
        assert len(ov_images) == 1
        if name == "hires":  # its first pass goes through 8-bit pixels, where fp32 rounding flips some levels
            (levels, fraction), = differences(ov_images, torch_images)  # measured: 1 level, 0.11 % of the values
            assert levels <= 1 and fraction <= 0.005, (levels, fraction)
        else:
            assert within_tolerance(ov_images, torch_images), differences(ov_images, torch_images)


@pytest.mark.parametrize("changed", ["first_stage_model.", "model.diffusion_model.input_blocks.1."])
def test_a_checkpoint_that_differs_only_mid_file_gets_its_own_converted_models(changed, tmp_path):
    """The cache keys are the weights themselves (sampled), not the file's fingerprint (its first and last MB,
    where neither a baked-in VAE nor most of the UNet lies): a second checkpoint that differs only there (its
    file fingerprint is the first one's) runs with its own decoder and UNet."""
    from ldm.checkpoints.hashes import checkpoint_fingerprint

    state = random_state_dict(load_model_config(TINY_CONFIG), seed=2025)
    ckpt_a = save_checkpoint(state, tmp_path / "a.safetensors")
    generator = torch.Generator().manual_seed(9)
    other = {k: (v + 0.05 * torch.randn(v.shape, generator=generator) if k.startswith(changed) else v)
             for k, v in state.items()}
    ckpt_b = save_checkpoint(other, tmp_path / "b.safetensors")
    assert checkpoint_fingerprint(ckpt_a) == checkpoint_fingerprint(ckpt_b)
    common = ["--config", str(TINY_CONFIG), "--device", "cpu", "--H", "64", "--W", "64", "--n_samples", "1", "--seed", "3",
              "--sampler", "ddim", "--ddim_steps", "2", "--prompt", "a fox", "--no-watermark", "--skip_grid"]
    runs = {}
    for name, ckpt, extra in (("a_ov", ckpt_a, openvino_argv(tmp_path / "cache")),
                              ("b_ov", ckpt_b, openvino_argv(tmp_path / "cache")), ("b_torch", ckpt_b, ())):
        assert optimized_txt2img.main([*common, "--ckpt", str(ckpt), "--outdir", str(tmp_path / name), *extra]) == 0
        runs[name] = pixels(tmp_path / name)
    assert within_tolerance(runs["b_ov"], runs["b_torch"]), differences(runs["b_ov"], runs["b_torch"])
    assert not within_tolerance(runs["a_ov"], runs["b_torch"])  # the change does give another image


def test_failing_openvino_vae_halves_leave_the_work_to_pytorch(tiny_checkpoint, tmp_path, cache, monkeypatch, caplog):
    from ldm.backends.vae_engine import OpenVinoVAEHalf

    def fails(self, x):
        raise RuntimeError("Exception from src/plugins/intel_cpu: out of resources")

    monkeypatch.setattr(OpenVinoVAEHalf, "__call__", fails)
    ov_images = run_case("img2img_ddim", tiny_checkpoint, tmp_path, openvino_argv(cache))
    assert "encoding in PyTorch: the OpenVINO VAE encoder failed" in caplog.text
    assert caplog.text.count("decoding in PyTorch: the OpenVINO VAE decoder failed") == 1  # then dropped for the run
    golden = [_read(path) for path in sorted((GOLDEN / "img2img_ddim").glob("*.png"))]
    assert within_tolerance(ov_images, golden), differences(ov_images, golden)


def test_engines_give_back_their_buffers_after_each_use(tiny_checkpoint, tmp_path, cache, monkeypatch):
    """OpenVINO keeps a compiled model's intermediate buffers between calls (0.75 GB for SD v1's decoder at 512
    px): the UNet's go after each batch's sampling, a VAE half's after each call, so that no two stages' sit
    side by side; and a call after a release still gives the same numbers."""
    from ldm.backends.shape_compiler import ShapeCompiler

    released = []
    release = ShapeCompiler.release_buffers
    monkeypatch.setattr(ShapeCompiler, "release_buffers", lambda self: released.append(self.name) or release(self))
    ov_images = run_case("img2img_ddim", tiny_checkpoint, tmp_path, openvino_argv(cache))
    assert released == ["VAE encoder", "UNet", "VAE decoder", "VAE decoder"], released  # one batch of two images
    golden = [_read(path) for path in sorted((GOLDEN / "img2img_ddim").glob("*.png"))]
    assert within_tolerance(ov_images, golden), differences(ov_images, golden)
