"""``--plan``: how much GPU memory each ``--vram`` mode would need for this run, answered from the config
alone (no checkpoint is read) by the VRAM ledger (:mod:`ldm.ledger`), then exit.

    python optimizedSD/optimized_txt2img.py --plan --H 768 --W 768 --gpu_memory 2
    python optimizedSD/optimized_txt2img.py --plan --json

Printed: the simulated peak of ``max_memory_allocated`` in full, medium and low mode (and low with the
given ``--vram_budget``), split into text encoder, UNet and VAE phases, and the mode ``--vram auto``
picks on a card with ``--gpu_memory`` GB free (default: the free memory of the detected GPU; with
neither, ``auto`` is null). ``--json`` prints one JSON object::

    {"height": 512, "width": 512, "batch": 1,
     "modes": {"full": {"peak_bytes": ..., "phase_peaks": {"text_encoder": ..., "unet": ..., "vae": ...},
                        "weight_bytes": ...},
               "medium": {...}, "low": {...}},
     "auto": "low"}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class PlanRequest:
    """What the plan needs from the command line (the rest of a run does not change its memory)."""

    config: str
    height: int
    width: int
    batch: int
    sampler: str
    steps: int
    scale: float
    attention: str
    fp16: bool
    vae_tiling: bool = False
    unet_chunk: int | None = None
    vram_budget_gb: float | None = None
    gpu_memory_gb: float | None = None


def gpu_bytes(gpu_memory_gb: float | None) -> int | None:
    """``--gpu_memory`` in bytes; without it, the free memory of the current CUDA device, or None."""
    if gpu_memory_gb is not None:
        return int(gpu_memory_gb * GIB)
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


def run_plan(request: PlanRequest, as_json: bool = False) -> str:
    """The plan as text (a table, or one JSON object)."""
    import torch

    from ldm.ledger import RunShape
    from ldm.ledger.plan import format_plan, memory_plan

    attention = "sliced" if request.attention == "sliced" else "sdpa"  # auto is sdpa on CUDA
    shape = RunShape(
        request.height, request.width, request.batch, request.sampler, request.steps, request.scale, attention,
        request.vae_tiling, request.unet_chunk,
    )
    card = gpu_bytes(request.gpu_memory_gb)
    budget = None if request.vram_budget_gb is None else int(request.vram_budget_gb * GIB)
    dtype = torch.float16 if request.fp16 else torch.float32
    plan = memory_plan(request.config, shape, dtype, budget_bytes=budget, gpu_bytes=card)
    return json.dumps(plan.as_json()) if as_json else format_plan(plan, card)
