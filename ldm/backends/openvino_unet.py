"""The UNet as an OpenVINO model on the CPU: ``unet(x, t, context) -> eps``, the calling convention of
:class:`ldm.models.unet.UNetModel`, so that guidance, every sampler, ``--unet_bs`` and inpainting's 9-channel
input run it unchanged.

The model is converted once with ``openvino.convert_model`` (TorchScript tracing of our UNet) with dynamic
batch, height, width and context length, and kept on disk (:class:`ldm.backends.ir_cache.IRCache`). Each input
shape a run meets is compiled on first use from that one model, reshaped to the static shape: OpenVINO's CPU
plugin is faster on static shapes than on dynamic ones (docs/benchmarks.md), and a compile takes seconds where
a conversion takes a minute. fp32 throughout (``INFERENCE_PRECISION_HINT``), so the numbers are PyTorch's
within fp32 rounding.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.backends.mapped_weights import dropping_pages
from ldm.backends.openvino_runtime import CPU_CONFIG, import_openvino

log = logging.getLogger(__name__)

Shapes = tuple[tuple[int, ...], ...]
KEEP_COMPILED = 2  # compiled shapes kept at once: a run meets one or two (a last --unet_bs chunk)


class OpenVinoUNet:
    """A converted UNet (an ``openvino.Model`` with dynamic shapes) compiled for the CPU per input shape;
    ``weights_file``: the ``model.bin`` it was read from, whose mapped pages are given back after each compile."""

    def __init__(self, model, in_channels: int, weights_file: Path | None = None) -> None:
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.model = model
        self.in_channels = in_channels
        self.weights_file = weights_file
        self.compiled: OrderedDict[Shapes, object] = OrderedDict()
        self.ahead: dict[Shapes, Future] = {}
        self._compiler: ThreadPoolExecutor | None = None

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"the OpenVINO UNet runs on the CPU, got latents on {x.device}")
        inputs = [x.detach().float().contiguous().numpy(), timesteps.detach().float().reshape(-1).numpy(),
                  context.detach().float().contiguous().numpy()]
        compiled = self._compiled(tuple(tuple(i.shape) for i in inputs))
        eps = compiled(inputs, share_inputs=True)[0]  # outputs are copied out of the request (share_outputs)
        return torch.from_numpy(eps).to(x.dtype)

    def compile_ahead(self, shapes: Shapes) -> None:
        """Start compiling ``shapes`` (the run's likely first UNet call) in a background thread, so that the
        compile overlaps the checkpoint's load and the prompts' encoding; a call with other shapes compiles its
        own as before. OpenVINO's compile leaves Python's lock while it works."""
        if shapes in self.compiled or shapes in self.ahead:
            return
        if self._compiler is None:
            self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-compile")
        self.ahead[shapes] = self._compiler.submit(self._compile, shapes)

    def _compiled(self, shapes: Shapes):
        if shapes in self.compiled:
            self.compiled.move_to_end(shapes)
            return self.compiled[shapes]
        pending = self.ahead.pop(shapes, None)
        if pending is None:
            self._drop_ahead()
        while len(self.compiled) >= KEEP_COMPILED:  # each holds its own copy of the weights
            self.compiled.popitem(last=False)
        compiled = pending.result() if pending is not None else self._compile(shapes)
        self.compiled[shapes] = compiled
        return compiled

    def _drop_ahead(self) -> None:
        """Forget the shapes compiled ahead when the run calls with others (a prompt over 75 tokens): each compiled
        model holds a copy of the weights. Waits for a compile still running, so that two never overlap."""
        for shapes, pending in self.ahead.items():
            pending.exception()  # waits; an error there concerns shapes no call needs
            log.info("the OpenVINO UNet compiled ahead for %s was not the run's first shape", shapes[0])
        self.ahead.clear()

    def _compile(self, shapes: Shapes):
        model = self.model.clone()
        model.reshape({port: self.ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes)})
        start = time.perf_counter()
        # The compiled model holds repacked weights: the file's pages can go, during the compile too.
        with dropping_pages(self.weights_file) if self.weights_file is not None else nullcontext():
            compiled = self.core.compile_model(model, "CPU", CPU_CONFIG)
        log.info("compiled the OpenVINO UNet for %s in %.1f s", shapes[0], time.perf_counter() - start)
        return compiled


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
