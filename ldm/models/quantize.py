"""int8 weights for the UNet (``--quantize int8``): one scale per output channel and group of 64 input
weights, dequantized as each layer runs.

Each ``nn.Linear`` and ``nn.Conv2d`` of the UNet is replaced by :class:`Int8Linear` / :class:`Int8Conv2d`,
which hold the weight as int8 ``q`` and scales ``s`` with ``w ~= s * q``: each output channel's row of
weights (a conv's ``in_channels * kh * kw``, flattened) is cut into groups of :data:`GROUP_SIZE`
consecutive weights (fewer where 64 does not divide the row: :func:`group_width`), and each group has
``s = max|w| / 127``, ``q = round(w / s)`` (symmetric, round to nearest; the group-wise scales of
GPTQ/AWQ-style weight-only quantization, Frantar et al. 2023, at 8 bits; with one group per row it is
LLM.int8()'s "vector-wise" weight quantization, Dettmers et al. 2022). At every call the layer multiplies
``q`` by ``s`` in the compute dtype on the compute device (one weight-sized temporary, alive for the
call) and runs the ordinary kernel.

Why groups of 64: on SD v1 shapes with random weights one UNet forward is 5.20 % (relative L2) from fp32
with one scale per row, 3.94 / 3.68 / 3.26 % with groups of 128 / 64 / 32, for 0.501 / 0.508 / 0.516 /
0.532x the fp16 weight bytes (docs/benchmarks.md). The forward's error is 6.2x the weights' rms error in
every variant; the 1 % target (scripts/benchmark.py) needs 0.16 % per weight, which costs 9.3 bits per weight for
Gaussian weights (these nearly are) by Shannon's rate-distortion bound, more than the 8.96 bits that
0.56x fp16 allows, whatever the code. 64 keeps low mode's streamed bytes at about half fp16's (0.516x) and medium mode under 1 GiB.

Why a module of our own: torchao quantizes linear layers only, and both torchao and optimum-quanto
keep the int8 data inside tensor subclasses. ``ldm.memory.residency`` moves a model by swapping each
parameter's and buffer's ``.data`` (and packs CPU copies into pinned slabs); plain int8 buffers move as
they are, so the memory modes carry half the bytes of fp16 (a quarter of fp32) with no change:
``full``/``medium`` keep int8 on the device, ``low`` streams int8 at every step.

Kept in floating point: the first and last convolutions (``input_blocks.0.0``, ``out.2``: 0.003 % of
the weights, and the layers most sensitive to error, as is usual), and every norm and bias.
``UNetModel.forward`` and the streamed UNet read the compute dtype from ``out.2``'s weight.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoints.mapped_pages import FileMappings

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
KEEP_FLOAT = frozenset({"input_blocks.0.0", "out.2"})
GROUP_SIZE: int | None = 64  # input weights per scale (None: one scale per output channel); see the docstring


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel (dim 0): ``(q int8, scale in weight.dtype)``."""
    q, scale = quantize_grouped(weight, None)
    return q, scale.view(-1)


def group_width(fan_in: int, group_size: int | None) -> int:
    """How many consecutive input weights share a scale: the largest divisor of ``fan_in`` that is at most
    ``group_size`` (so the groups tile each output channel's row exactly), or the whole row with None."""
    if group_size is None or group_size >= fan_in:
        return fan_in
    return next(width for width in range(group_size, 0, -1) if fan_in % width == 0)


def quantize_grouped(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel and group of :func:`group_width` input weights
    (a conv's row is ``in_channels * kh * kw``, flattened): ``(q int8 shaped as weight, scale [out, groups]
    in weight.dtype)``, ``w ~= scale * q`` group by group."""
    w = weight.detach().float()
    rows = w.reshape(w.shape[0], -1)
    width = group_width(rows.shape[1], group_size)
    groups = rows.view(rows.shape[0], -1, width)
    low, high = torch.aminmax(groups, dim=2)  # no |w| copy: max|w| = max(-min, max)
    scale = torch.maximum(-low, high).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = (groups / scale.unsqueeze(2)).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(weight.shape), scale.to(weight.dtype)


class _Int8Weight(nn.Module):
    """Holds ``weight_int8`` (the weight's shape) and ``weight_scale`` ([out, groups]) as buffers (so
    ``.to()`` and the residency move them) and ``bias`` as the float parameter it was."""

    def _set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int | None) -> None:
        q, scale = quantize_grouped(weight, group_size)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """``scale * q`` in the scale's dtype (the model's), on the buffers' device: one fp16 (or fp32)
        copy of the weight, alive while the layer runs."""
        q, scale = self.weight_int8, self.weight_scale
        groups = q.view(q.shape[0], scale.shape[1], -1)
        return (groups * scale.unsqueeze(2)).view(q.shape)  # int8 * float promotes: one kernel

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype


class Int8Linear(_Int8Weight):
    def __init__(self, linear: nn.Linear, group_size: int | None = GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._set_weight(linear.weight, linear.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Conv2d(_Int8Weight):
    def __init__(self, conv: nn.Conv2d, group_size: int | None = GROUP_SIZE):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"int8 convolution supports zero padding only, not {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._set_weight(conv.weight, conv.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


def quantize_unet(unet: nn.Module, mode: str = "int8", group_size: int | None = GROUP_SIZE) -> int:
    """Replace the UNet's linear and conv layers (but :data:`KEEP_FLOAT`) by int8 ones, in place; each
    float weight is released as its layer is replaced. Returns the weight bytes saved."""
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantization {mode!r}; choose {', '.join(QUANTIZE_CHOICES)}")
    started, saved, released, count = time.perf_counter(), 0, 0, 0
    file_pages = FileMappings()  # weights still in the checkpoint's map (load_stable_diffusion(copy_weights=False))
    for name, module in list(unet.named_modules()):
        if name in KEEP_FLOAT or type(module) not in (nn.Linear, nn.Conv2d):
            continue
        kind = Int8Linear if isinstance(module, nn.Linear) else Int8Conv2d
        replacement = kind(module, group_size)
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, replacement)
        weight, module.weight = module.weight.data, None  # the float copy goes now, not when the loop ends
        saved += _nbytes(weight) - _nbytes(replacement.weight_int8, replacement.weight_scale)
        released += file_pages.drop(weight)
        count += 1
    log.info("int8 weights for %d UNet layers in %.1f s (%.2f GiB saved, %.2f GiB of mapped file pages released)",
             count, time.perf_counter() - started, saved / 2**30, released / 2**30)
    return saved


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
