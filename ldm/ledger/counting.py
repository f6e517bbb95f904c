"""Live device bytes of a run on PyTorch's ``meta`` device: the simulation's ``max_memory_allocated``.

On ``meta`` every op runs for its shapes only (no data, no memory), so what a run would hold on a GPU
can be counted instead of measured: :class:`DeviceBytes` is a ``TorchDispatchMode`` that sees every
aten op's outputs, adds each new storage on the counted device once (views share it), and subtracts it
when the storage dies (a weak-reference callback). That is what CUDA's caching allocator reports as
``memory_allocated`` (less its rounding of each block up to 512 bytes: under 1 MiB for SD v1's ~1,100
weights, and what the GPU check calibrates).

Storages that exist before the mode is entered are not counted: a model built on ``meta`` stands for
the weights' host ("home") copies, and only the device copies that :class:`ldm.memory.residency.Residency`
makes (``track_cpu_copies``: a real copy on the stand-in device) are device memory. Which of the live
bytes are weights is told after each onload (:meth:`DeviceBytes.mark_weights`); the rest are activations.

Peaks are kept per phase (``with counter.phase("unet"):``): the most live bytes seen while the phase
ran, split into weights and activations at that moment.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

@dataclass(frozen=True)
class Peak:
    """The most live device bytes seen (``total``), and how many of them were weights then."""

    total: int = 0
    weights: int = 0

    @property
    def activations(self) -> int:
        return self.total - self.weights


class DeviceBytes(TorchDispatchMode):
    """Counts the live bytes of storages created on ``device_type`` while the mode is active."""

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.weights = 0
        self.peak = Peak()
        self.phase_peaks: dict[str, Peak] = {}
        self._phase: str | None = None
        self._tracked: dict[int, int] = {}  # storage id -> counted bytes
        self._weight_keys: set[int] = set()

    # -- what the mode sees --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [v for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor) and v.device.type == self.device_type]
        if outputs:
            # A view or an in-place op returns an input's storage: counted already, or a home copy (not counted).
            inputs = {v.untyped_storage()._cdata for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)}
            for value in outputs:
                storage = value.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._tracked:
            return
        nbytes = storage.nbytes()
        self._tracked[key] = nbytes
        weakref.finalize(storage, self._release, key)
        self._add(nbytes)

    def _release(self, key: int) -> None:
        if key in self._weight_keys:
            self._weight_keys.discard(key)
            self.weights -= self._tracked[key]
        self._add(-self._tracked.pop(key))

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if nbytes <= 0:
            return
        if self.live > self.peak.total:
            self.peak = Peak(self.live, self.weights)
        if self._phase is not None and self.live > self.phase_peaks[self._phase].total:
            self.phase_peaks[self._phase] = Peak(self.live, self.weights)

    def mark_weights(self, tensors) -> None:
        """The storages of ``tensors`` (a model's device copies, just made) are weights from now until they die.

        Copying only adds bytes, so a peak reached during the copy is reached at its end, now: it is
        re-attributed with these weights counted as weights, not activations."""
        at_peak = self.live == self.peak.total
        at_phase_peak = self._phase is not None and self.live == self.phase_peaks[self._phase].total
        for tensor in tensors:
            key = tensor.untyped_storage()._cdata
            if key in self._tracked and key not in self._weight_keys:
                self._weight_keys.add(key)
                self.weights += self._tracked[key]
        if at_peak:
            self.peak = Peak(self.live, self.weights)
        if at_phase_peak:
            self.phase_peaks[self._phase] = Peak(self.live, self.weights)

    @property
    def current_phase(self) -> str | None:
        """The phase the run is in now (None outside every phase)."""
        return self._phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the peaks seen inside the block to ``name`` (and to the run's overall peak)."""
        previous, self._phase = self._phase, name
        self.phase_peaks.setdefault(name, Peak())
        try:
            yield
        finally:
            self._phase = previous

