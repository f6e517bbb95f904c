"""One converted OpenVINO model (dynamic shapes) compiled for the CPU per input shape, on first use or ahead in a
background thread: OpenVINO's CPU plugin is faster on static shapes than on dynamic ones (docs/benchmarks.md),
and a compile takes seconds where a conversion takes a minute. fp32 throughout (``INFERENCE_PRECISION_HINT``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from ldm.backends.mapped_weights import dropping_pages
from ldm.backends.openvino_runtime import CPU_CONFIG, import_openvino

log = logging.getLogger(__name__)

Shapes = tuple[tuple[int, ...], ...]
KEEP_COMPILED = 2  # compiled shapes kept at once: a run meets one or two (a last --unet_bs chunk)


class ShapeCompiler:
    """``model`` (an ``openvino.Model`` with dynamic shapes) compiled per input shape; ``weights_file``: the
    ``model.bin`` it was read from, whose mapped pages are given back during and after each compile (the
    compiled model holds its own repacked copy); ``name`` for the log lines."""

    def __init__(self, model, name: str, weights_file: Path | None = None) -> None:
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.model = model
        self.name = name
        self.weights_file = weights_file
        self.compiled: OrderedDict[Shapes, object] = OrderedDict()
        self.ahead: Future | None = None  # (shapes, compiled model) being made in the background
        self._compiler: ThreadPoolExecutor | None = None

    def compile_ahead(self, shapes: Shapes | Callable[[], Shapes]) -> None:
        """Start compiling ``shapes`` (the run's likely first call; or a function that works them out, run in the
        same background thread) so that the compile overlaps the checkpoint's load; the first call takes it if
        its shapes are these, and compiles its own otherwise. OpenVINO's compile leaves Python's lock while it
        works. One job until the first call takes or drops it: a second call before then is ignored."""
        if self.ahead is not None:
            return
        if self._compiler is None:
            self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-compile")

        def work():
            wanted = shapes() if callable(shapes) else shapes
            return wanted, self._compile(wanted)

        self.ahead = self._compiler.submit(work)

    def for_shapes(self, shapes: Shapes):
        """The compiled model for these input shapes: kept, compiled ahead, or compiled now."""
        if shapes in self.compiled:
            self.compiled.move_to_end(shapes)
            return self.compiled[shapes]
        compiled = self._take_ahead(shapes)
        while len(self.compiled) >= KEEP_COMPILED:  # each holds its own copy of the weights
            self.compiled.popitem(last=False)
        if compiled is None:
            compiled = self._compile(shapes)
        self.compiled[shapes] = compiled
        return compiled

    def release_buffers(self) -> None:
        """Give back the compiled models' intermediate buffers, which OpenVINO's CPU plugin otherwise keeps between
        calls (measured at 512 px: 0.37 GB for SD v1's VAE encoder, 0.75 GB for its decoder); the next call
        allocates them again (about 0.4 s of the decoder's 12 s). Their weights stay. An OpenVINO without
        ``CompiledModel.release_memory`` keeps them."""
        for compiled in self.compiled.values():
            release = getattr(compiled, "release_memory", None)
            if release is not None:
                release()

    @contextmanager
    def in_use(self) -> Iterator[ShapeCompiler]:
        """This engine for a stretch of calls (a batch's sampling), its buffers given back after it, so that they
        do not sit beside the next stage's (the VAE's), as :meth:`ldm.memory.residency.Residency.use` moves a
        PyTorch model off the device."""
        try:
            yield self
        finally:
            self.release_buffers()

    def _take_ahead(self, shapes: Shapes):
        """The model compiled ahead if it is for ``shapes``, else None (then it is dropped: each compiled model
        holds a copy of the weights). Waits for a compile still running, so that two never overlap; an error
        there is logged, and compiling the needed shapes now shows it again if it concerns them."""
        if self.ahead is None:
            return None
        pending, self.ahead = self.ahead, None
        self._compiler.shutdown(wait=False)  # its one job is done: no idle thread left behind
        self._compiler = None
        try:
            ahead_shapes, compiled = pending.result()
        except Exception as error:  # any: only a head start is lost
            log.warning("compiling the OpenVINO %s ahead failed (%s); compiling it now", self.name, error)
            return None
        if ahead_shapes == shapes:
            return compiled
        log.info("the OpenVINO %s compiled ahead for %s was not the run's first shape %s", self.name,
                 ahead_shapes[0], shapes[0])
        return None

    def _compile(self, shapes: Shapes):
        model = self.model.clone()
        model.reshape({port: self.ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes)})
        start = time.perf_counter()
        with dropping_pages(self.weights_file) if self.weights_file is not None else nullcontext():
            compiled = self.core.compile_model(model, "CPU", CPU_CONFIG)
        log.info("compiled the OpenVINO %s for %s in %.1f s", self.name, shapes[0], time.perf_counter() - start)
        return compiled
