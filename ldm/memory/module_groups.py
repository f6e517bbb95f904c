"""Modules whose weights move together between their CPU home and the compute device (the idea of diffusers'
``hooks/group_offloading.py`` ``ModuleGroup``, without its forward hooks), and the pinned slabs their homes
live in on CUDA."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def tensors_of(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of ``modules``, each once (a shared tensor is moved once)."""
    seen: set[int] = set()
    tensors = []
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


class ModuleGroup:
    """Some modules whose parameters and buffers move together between their CPU home and a device.

    The CPU copy ("home") is the only one kept on the host; :meth:`onload` points every ``tensor.data``
    at a fresh device copy, :meth:`offload` points it back at the home copy and drops the device one.
    """

    def __init__(self, name: str, modules: list[nn.Module], home: str = "cpu"):
        self.name = name
        self.tensors = tensors_of(modules)
        for tensor in self.tensors:
            if tensor.device.type != home:
                raise ValueError(f"{name}: models must be on the CPU when handed to Residency (found {tensor.device})")
        self.refresh_home()
        self.on_device = False
        self.ready: torch.cuda.Event | None = None  # set when the copy was issued on a side stream

    def refresh_home(self) -> None:
        """Take the tensors' current (CPU) storage as their home, e.g. after :func:`pin_together` moved it."""
        self.home = [tensor.data for tensor in self.tensors]
        self.nbytes = sum(home.numel() * home.element_size() for home in self.home)

    def onload(self, device: torch.device, copy: bool, stream: torch.cuda.Stream | None = None) -> None:
        """Point the tensors at device copies; on CUDA with ``stream``, copy there and record ``ready``.

        All or nothing: if a copy fails (out of memory halfway through), every tensor points back at its
        home copy before the error goes on, so no device copy is left behind unaccounted for.
        """
        try:
            self._copy_to(device, copy, stream)
        except BaseException:
            self.offload()
            raise
        self.on_device = True

    def _copy_to(self, device: torch.device, copy: bool, stream: torch.cuda.Stream | None) -> None:
        if device.type == "cuda" and stream is not None:
            with torch.cuda.stream(stream):
                for tensor, home in zip(self.tensors, self.home):
                    tensor.data = home.to(device, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        elif device.type in ("cpu", "meta"):
            if copy:  # a stand-in device (CPU for tests, meta for the VRAM ledger): a real, separate copy
                for tensor, home in zip(self.tensors, self.home):
                    tensor.data = home.clone()
        else:
            for tensor, home in zip(self.tensors, self.home):
                tensor.data = home.to(device, non_blocking=home.is_pinned())

    def wait(self) -> None:
        """Make the current CUDA stream wait for a side-stream copy, and tell the allocator it uses it."""
        if self.ready is None or not self.tensors:
            return
        current = torch.cuda.current_stream(self.tensors[0].device)  # the group's device, not the current one
        current.wait_event(self.ready)
        for tensor in self.tensors:
            # The copy was allocated on the side stream: without this, freeing it at offload could let the
            # next prefetch reuse the memory while the compute stream still reads it.
            tensor.data.record_stream(current)
        self.ready = None

    def offload(self) -> None:
        for tensor, home in zip(self.tensors, self.home):
            tensor.data = home
        self.on_device = False
        self.ready = None


def pinned_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


PIN_SLAB_BYTES = 256 << 20


def pin_together(
    tensors: list[torch.Tensor], allocate: Callable[[int], torch.Tensor] = pinned_buffer, slab_bytes: int = PIN_SLAB_BYTES
) -> int:
    """Move the tensors' CPU storage into page-locked slabs; returns the bytes allocated.

    Pinned memory is what lets a host-to-device copy run on a side stream. PyTorch's pinned host allocator
    rounds every allocation up to a power of two (pinning each of SD v1's ~1,100 weights alone cost about a
    third more host memory), so the tensors are packed, largest first, into slabs of ``slab_bytes`` (a
    power of two). Each tensor's old storage is freed as it moves, if nothing else holds it: the host
    peak is the weights plus about one slab, not twice the weights. Tensors already pinned stay.
    """
    todo = sorted((t for t in tensors if not t.data.is_pinned()), key=lambda t: -t.numel() * t.element_size())
    slabs: list[list] = []  # [buffer, bytes used]
    allocated = 0
    for tensor in todo:
        nbytes = tensor.numel() * tensor.element_size()
        size = -(-nbytes // 64) * 64  # 64-byte aligned starts, so any dtype can view the bytes
        slab = next((slab for slab in slabs if slab[1] + size <= slab[0].numel()), None)
        if slab is None:
            capacity = max(slab_bytes, 1 << max(size - 1, 0).bit_length())
            slab = [allocate(capacity), 0]
            slabs.append(slab)
            allocated += capacity
        home = slab[0][slab[1] : slab[1] + nbytes].view(tensor.dtype).view(tensor.shape)
        home.copy_(tensor.data)
        tensor.data = home
        slab[1] += size
    return allocated
