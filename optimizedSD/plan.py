"""``--plan``: how much GPU memory each ``--vram`` mode would need for this run, answered from the config
alone (no checkpoint is read) by the VRAM ledger (:mod:`ldm.ledger`), then exit. What the ledger runs on
the ``meta`` device is the generation loop's own stages (:func:`ldm.ledger.calls.generation_calls`): the run's prompts, the
init image's encode, the first batch's sampling (the steps after the sampler's history fills repeat) and
its decode.

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

import torch

from ldm.checkpoints.vae_files import vae_is_tiny
from ldm.conditioning.fork_syntax import parse_prompt
from ldm.conditioning.prompts import distinct
from ldm.config import load_model_config
from ldm.ledger.calls import generation_calls
from ldm.ledger.plan import format_plan, memory_plan
from ldm.ledger.shapes import RunShape
from ldm.passes.hires import final_size
from ldm.pipeline.images import load_init_image, output_size
from ldm.pipeline.input_checks import read_prompts_file
from ldm.pipeline.model import attention_name
from optimizedSD.arguments import resolve_config

log = logging.getLogger(__name__)


def gpu_bytes(request_bytes: int | None) -> int | None:
    """``--gpu_memory`` in bytes; without it, the free memory of the current CUDA device, or None."""
    if request_bytes is not None:
        return request_bytes
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


def plan_text(request) -> str:
    """``--plan``'s answer for a parsed request: a table, or with ``plan_json`` one JSON object."""
    plan = plan_for(request)
    hires = None if request.hires is None else final_size(request, plan.shape.height, plan.shape.width)
    if request.plan_json:
        return json.dumps({**plan.as_json(), **({"hires": {"height": hires[0], "width": hires[1]}} if hires else {})})
    text = format_plan(plan, gpu_bytes(request.gpu_memory_bytes))
    return text if hires is None else f"{text}\nhires fix to {hires[1]}x{hires[0]}: the peaks include its second pass"


def plan_for(request):
    """The :class:`~ldm.ledger.plan.MemoryPlan` of a parsed :class:`~ldm.pipeline.request.GenerationRequest`.
    The memory is the GPU's: fp16 unless ``--precision full``; the UNet as ``--quantize`` and ``--tome``
    make it; the VAE a TAESD's when ``--vae`` names one."""
    config = request.config or resolve_config(None)
    load_model_config(config)  # a bad config is the user's one-line error, before any simulation
    prompts = distinct(read_prompts_file(request.from_file) if request.from_file else [request.prompt])
    for text in (*prompts, request.negative_prompt):
        parse_prompt(text)
    init_image = load_init_image(request.init_img) if request.img2img else None
    height, width = output_size(request, init_image)
    attention = attention_name(request.attention, request.device)
    shape = RunShape(height, width, request.n_samples, request.sampler, request.steps, request.scale, attention,
                     request.vae_tiling, request.unet_bs, request.img2img)
    card = gpu_bytes(request.gpu_memory_bytes)
    dtype = torch.float16 if request.precision == "autocast" else torch.float32
    return memory_plan(str(config), shape, dtype, budget_bytes=request.vram_budget_bytes, gpu_bytes=card,
                       calls=generation_calls(request, prompts, init_image), quantize=request.quantize,
                       tome=request.tome, taesd=request.vae is not None and vae_is_tiny(request.vae))
