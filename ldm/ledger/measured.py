"""The ledger's calls measured on a real CUDA device: the check of its predictions (``scripts/gpu_check.py``,
and ``tests/test_vram_ledger.py`` where CUDA exists)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ldm.models.attention import attention_backend
from ldm.ledger.calls import generation_calls
from ldm.ledger.shapes import RunShape
from ldm.memory.residency import Residency


def measure_on_cuda(sd, mode: str, shape: RunShape, device: torch.device) -> dict:
    """Run the calls on ``device`` in ``mode``: the overall and per-phase peaks above the start, seconds."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    phases: dict[str, int] = {}

    @contextmanager
    def phase(name: str):
        before = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        finally:
            torch.cuda.synchronize(device)
            phases[name] = max(phases.get(name, 0), torch.cuda.max_memory_allocated(device) - base)
            torch.cuda.reset_peak_memory_stats(device)
            overall["peak"] = max(overall["peak"], before - base, phases[name])

    overall = {"peak": 0}
    residency = Residency(sd, device, mode)
    started = time.perf_counter()
    with attention_backend(shape.attention), torch.no_grad():
        generation_calls()(sd, residency, shape, device, phase)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    residency.release()
    overall["peak"] = max(overall["peak"], torch.cuda.max_memory_allocated(device) - base)
    return {"peak_bytes": overall["peak"], "phase_peaks": phases, "seconds": seconds}
