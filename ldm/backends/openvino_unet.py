"""The UNet as an OpenVINO model on the CPU: ``unet(x, t, context) -> eps``, the calling convention of
:class:`ldm.models.unet.UNetModel`, so that guidance, every sampler, ``--unet_bs`` and inpainting's 9-channel
input run it unchanged.

The model is converted once with ``openvino.convert_model`` (TorchScript tracing of our UNet) with dynamic
batch, height, width and context length, and kept on disk (:class:`ldm.backends.ir_cache.IRCache`). Each input
shape a run meets is compiled from that one model (:class:`ldm.backends.shape_compiler.ShapeCompiler`). fp32
throughout, so the numbers are PyTorch's within fp32 rounding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.backends.openvino_runtime import import_openvino
from ldm.backends.shape_compiler import ShapeCompiler

log = logging.getLogger(__name__)

class OpenVinoUNet(ShapeCompiler):
    """A converted UNet (an ``openvino.Model`` with dynamic shapes) compiled for the CPU per input shape;
    ``weights_file``: the ``model.bin`` it was read from."""

    def __init__(self, model, in_channels: int, weights_file: Path | None = None) -> None:
        super().__init__(model, "UNet", weights_file)
        self.in_channels = in_channels

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"the OpenVINO UNet runs on the CPU, got latents on {x.device}")
        inputs = [x.detach().float().contiguous().numpy(), timesteps.detach().float().reshape(-1).numpy(),
                  context.detach().float().contiguous().numpy()]
        compiled = self.for_shapes(tuple(tuple(i.shape) for i in inputs))
        eps = compiled(inputs, share_inputs=True)[0]  # outputs are copied out of the request (share_outputs)
        return torch.from_numpy(eps).to(x.dtype)


def convert_unet(unet: nn.Module, in_channels: int, context_dim: int,
                 progress: Callable[[str], object] | None = None):
    """``openvino.convert_model`` of ``unet`` with dynamic batch, height, width and context length; traced on a
    small example (the shapes are symbolic, the example only drives the trace)."""
    ov = import_openvino()
    example = (torch.zeros(2, in_channels, 16, 16), torch.full((2,), 500.0), torch.zeros(2, 77, context_dim))
    inputs = [ov.PartialShape([-1, in_channels, -1, -1]), ov.PartialShape([-1]), ov.PartialShape([-1, -1, context_dim])]
    if progress is not None:
        progress("converting the UNet for OpenVINO (once for these weights: about a minute for SD v1)...")
    start = time.perf_counter()
    with torch.no_grad():
        # Traced here, without the trace check: handing OpenVINO the module traces and checks it (twice the time).
        traced = torch.jit.trace(unet, example, check_trace=False)
        model = ov.convert_model(traced, example_input=example, input=inputs)
    if progress is not None:
        progress(f"converted the UNet for OpenVINO in {time.perf_counter() - start:.0f} s")
    return model


def release_weights(module: nn.Module) -> int:
    """Point every parameter and buffer of ``module`` at an empty tensor of its dtype, once the compiled model
    holds the weights (no second resident copy); the bytes given back. The module cannot run afterwards."""
    freed = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        freed += tensor.numel() * tensor.element_size()
        tensor.data = torch.empty(0, dtype=tensor.dtype)
    return freed
