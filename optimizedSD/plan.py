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

log = logging.getLogger(__name__)


def gpu_bytes(request_bytes: int | None) -> int | None:
    """``--gpu_memory`` in bytes; without it, the free memory of the current CUDA device, or None."""
    if request_bytes is not None:
        return request_bytes
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


def plan_text(request) -> str:
    """The plan for a parsed :class:`~optimizedSD.request.GenerationRequest` with ``plan`` set: a table, or
    with ``plan_json`` one JSON object. The memory is the GPU's: fp16 unless ``--precision full``."""
    import torch

    from ldm.config import load_model_config
    from ldm.ledger import RunShape
    from ldm.ledger.plan import format_plan, memory_plan
    from optimizedSD.images import load_init_image, output_size

    load_model_config(request.config)  # a bad config is the user's one-line error, before any simulation
    init_image = load_init_image(request.init_img) if request.img2img else None
    height, width = output_size(request, init_image)
    attention = "sliced" if request.attention == "sliced" else "sdpa"  # auto means sdpa on CUDA
    shape = RunShape(height, width, request.n_samples, request.sampler, request.steps, request.scale, attention,
                     request.vae_tiling, request.unet_bs, request.img2img)
    card = gpu_bytes(request.gpu_memory_bytes)
    dtype = torch.float16 if request.precision == "autocast" else torch.float32
    plan = memory_plan(str(request.config), shape, dtype, budget_bytes=request.vram_budget_bytes, gpu_bytes=card)
    return json.dumps(plan.as_json()) if request.plan_json else format_plan(plan, card)
