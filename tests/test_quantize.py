"""int8 UNet weights (``--quantize int8``): per-channel scales, the error they leave, the bytes they save."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.models.quantize import Int8Conv2d, Int8Linear, group_width, quantize_grouped, quantize_per_channel, quantize_unet
from ldm.memory.residency import Residency, TransferEvent


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


@pytest.fixture()
def pair(tiny_checkpoint, tiny_config_path):
    """The tiny model in fp32, and a second copy with an int8 UNet."""
    exact = load_stable_diffusion(tiny_checkpoint, tiny_config_path)
    quantized = load_stable_diffusion(tiny_checkpoint, tiny_config_path)
    quantize_unet(quantized.unet)
    return exact, quantized


def _inputs(batch: int = 2, size: int = 16):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, size, size, generator=generator), torch.tensor([1.0, 600.0])[:batch],
            torch.randn(batch, 77, 32, generator=generator))


def test_per_channel_scales_bound_the_error():
    weight = torch.randn(6, 5, 3, 3) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 0.0, 2.0]).view(-1, 1, 1, 1)
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert q.abs().amax(dim=(1, 2, 3)).tolist() == [127, 127, 127, 127, 0, 127]  # each channel uses the full range
    error = (q.float() * scale.view(-1, 1, 1, 1) - weight).abs()
    assert (error <= scale.view(-1, 1, 1, 1) / 2 + 1e-7).all()  # round to nearest: half a step at most


def test_group_widths_tile_each_row():
    assert group_width(320, 64) == 64 and group_width(2880, 64) == 64  # 320 * 3 * 3
    assert group_width(8640, 128) == 120 and group_width(960, 128) == 120  # 960 channels: no 128 divides them
    assert group_width(72, 64) == 36 and group_width(7, 64) == 7 and group_width(4096, None) == 4096


def test_group_scales_bound_the_error_within_each_group():
    """A 3x3 conv's row (in_channels * 9 weights, flattened) in groups: each weight within half of its own
    group's step, and on Gaussian weights a smaller error than one scale per output channel."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 32, 3, 3, generator=generator)
    weight[3, 5] *= 20  # an outlier spoils one group's step, not the whole channel's
    q, scale = quantize_grouped(weight, 64)
    assert q.shape == weight.shape and q.dtype == torch.int8
    assert scale.shape == (16, 6)  # 288 = 6 * 48: the largest width <= 64 that divides the row
    steps = scale.repeat_interleave(48, dim=1).view(weight.shape)
    assert ((q.float() * steps - weight).abs() <= steps / 2 + 1e-6).all()

    def rms_error(group_size):
        q, scale = quantize_grouped(weight, group_size)
        steps = scale.repeat_interleave(q[0].numel() // scale.shape[1], dim=1).view(weight.shape)
        return (q.float() * steps - weight).norm().item()

    assert rms_error(64) < 0.8 * rms_error(None)


def test_layers_compute_with_the_dequantized_weight():
    generator = torch.Generator().manual_seed(1)
    linear, conv = nn.Linear(256, 8), nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x, image = torch.randn(3, 256, generator=generator), torch.randn(1, 4, 9, 9, generator=generator)
    q_linear, q_conv = Int8Linear(linear), Int8Conv2d(conv)
    with torch.no_grad():
        assert q_linear.weight_scale.shape == (8, 4)  # 256 inputs: four groups of 64
        dequantized = q_linear.weight_int8.float() * q_linear.weight_scale.repeat_interleave(64, dim=1)
        assert torch.allclose(q_linear(x), x @ dequantized.T + linear.bias, atol=1e-6)
        assert _relative_error(q_linear(x), linear(x)) < 0.01
        assert _relative_error(q_conv(image), conv(image)) < 0.01
        assert q_conv(image).shape == conv(image).shape == (1, 6, 5, 5)


def test_unet_forward_error(pair):
    """Each layer alone stays within 1 % of fp32 (above); the whole tiny UNet, with ~45 int8 layers whose
    errors add up, within 1.95 %: measured 1.80 % with groups of 64 (one scale per output channel: 2.02 %;
    full SD v1 shapes: 3.68 %, per channel 5.20 %; see docs/benchmarks.md)."""
    exact, quantized = pair
    x, t, context = _inputs()
    with torch.no_grad():
        error = _relative_error(quantized.unet(x, t, context), exact.unet(x, t, context))
    assert 1e-3 < error < 0.0195


def test_int8_weights_are_a_quarter_of_fp32_and_stream_as_such(pair):
    exact, quantized = pair

    def unet_bytes(unet):
        return sum(t.numel() * t.element_size() for t in list(unet.parameters()) + list(unet.buffers()))

    kinds = {type(m) for m in quantized.unet.modules()}
    assert nn.Linear not in kinds and Int8Linear in kinds and Int8Conv2d in kinds
    assert [type(quantized.unet.out[2]), type(quantized.unet.input_blocks[0][0])] == [nn.Conv2d, nn.Conv2d]
    ratio = unet_bytes(quantized.unet) / unet_bytes(exact.unet)
    assert 0.25 < ratio < 0.3  # norms, biases, scales and the two float convs stay fp32

    streamed = {}
    for name, sd in (("fp32", exact), ("int8", quantized)):
        events: list[TransferEvent] = []
        residency = Residency(sd, "cpu", "low", on_transfer=events.append, track_cpu_copies=True)
        x, t, context = _inputs()
        with torch.no_grad(), residency.use("unet") as unet:
            unet(x, t, context)
        residency.release()
        streamed[name] = sum(e.nbytes for e in events if e.event == "onload" and e.group.startswith("unet."))
    assert streamed["int8"] >= unet_bytes(quantized.unet)  # every weight streamed in a step...
    assert streamed["int8"] / streamed["fp32"] == pytest.approx(ratio, rel=0.02)  # ...at int8's size


@pytest.mark.parametrize("mode", ["full", "medium", "low"])
def test_every_memory_mode_runs_the_int8_unet_alike(pair, mode):
    _, quantized = pair
    x, t, context = _inputs()
    with torch.no_grad():
        expected = quantized.unet(x, t, context)
        residency = Residency(quantized, "cpu", mode, track_cpu_copies=True)
        with residency.use("unet") as unet:
            got = unet(x, t, context)
        residency.release()
    assert torch.equal(got, expected)


def test_fp16_model_keeps_fp16_scales(tiny_checkpoint, tiny_config_path):
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path, dtype=torch.float16)
    quantize_unet(sd.unet)
    layer = sd.unet.middle_block[1].transformer_blocks[0].attn1.to_q
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_scale.dtype == torch.float16
    assert layer.dequantized_weight().dtype == torch.float16


def test_unknown_mode():
    with pytest.raises(ValueError, match="choose int8"):
        quantize_unet(nn.Sequential(), "int4")


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; the release is Linux-only")
def test_quantizing_gives_back_the_memory_mapped_float_weights(tmp_path):
    """An fp32 weight read from a memory-mapped .safetensors is the file's pages: once it is quantized, those
    pages leave the process (else the float copy would stay resident next to the int8 one)."""
    from ldm.checkpoints.reader import read_checkpoint
    from ldm.loading.random_weights import save_checkpoint

    weights = {"0.weight": torch.randn(4096, 4096), "0.bias": torch.randn(4096), "keep": torch.randn(1024)}
    state = read_checkpoint(save_checkpoint(weights, tmp_path / "big.safetensors"))  # 64 MiB, memory-mapped
    keep = state.pop("keep")  # another tensor of the file stays alive: the mapping stays
    model = nn.Sequential(nn.Linear(4096, 4096))
    model.load_state_dict(state, assign=True)
    del state
    x = torch.randn(2, 4096)
    with torch.no_grad():
        expected = model(x)  # reads every page of the weight
        before = _rss_file_bytes()
        quantize_unet(model)
        after = _rss_file_bytes()
        assert _relative_error(model(x), expected) < 0.01
    assert before - after > 60 * 2**20
    assert torch.equal(keep, weights["keep"])  # the rest of the file reads as before
