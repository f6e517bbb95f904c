"""``--plan``: how much GPU memory each ``--vram`` mode would need for this run, answered from the config
alone (no checkpoint is read) by the VRAM ledger (:mod:`ldm.ledger`), then exit. What the ledger runs on
the ``meta`` device is the generation loop's own stages (:func:`generation_stages`): the run's prompts, the
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

from ldm.ledger.plan import format_plan

log = logging.getLogger(__name__)


def gpu_bytes(request_bytes: int | None) -> int | None:
    """``--gpu_memory`` in bytes; without it, the free memory of the current CUDA device, or None."""
    if request_bytes is not None:
        return request_bytes
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


class _Discard:
    """Where the plan's decoded images go: nowhere (a simulated image has no pixels to write)."""

    def add(self, batch, k: int, decoded, safety: str | None = None) -> None:
        pass


def generation_stages(request, prompts: list[str], init_image):
    """The generation loop's own stages (:mod:`optimizedSD.generation`) as the ledger's calls: the prompts,
    the init image's encode (img2img), the first batch's sampling and its decode, one image at a time."""
    from dataclasses import replace

    from optimizedSD import generation

    def calls(sd, residency, shape, device, phase) -> None:
        run = replace(request, device=device, steps=shape.steps, embedding_cache=None, skip_save=True, skip_grid=True)
        model = generation.LoadedModel(sd, residency, sd.schedule)
        with phase("text_encoder"):
            encoder = generation.encode_prompts(run, prompts, model)
        init = None
        if run.img2img:
            with phase("vae"):
                init = generation.InitImage.encode(init_image, shape.width, shape.height, model, run.dtype)
        factor = sd.config.downsampling_factor
        latent_shape = (sd.config.latent_channels, shape.height // factor, shape.width // factor)
        batch = next(generation.plan_batches(run, prompts))
        with phase("unet"):
            latents = generation.sample_batch(run, model, encoder, init, batch, latent_shape)
        with phase("vae"):
            generation.decode_and_write(model, batch, latents, shape.tiled, _Discard())

    return calls


def plan_text(request) -> str:
    """``--plan``'s answer for a parsed request: a table, or with ``plan_json`` one JSON object."""
    plan = plan_for(request)
    return json.dumps(plan.as_json()) if request.plan_json else format_plan(plan, gpu_bytes(request.gpu_memory_bytes))


def plan_for(request):
    """The :class:`~ldm.ledger.plan.MemoryPlan` of a parsed :class:`~optimizedSD.request.GenerationRequest`.
    The memory is the GPU's: fp16 unless ``--precision full``; the UNet as ``--quantize`` and ``--tome``
    make it."""
    import torch

    from ldm.config import load_model_config
    from ldm.ledger import RunShape
    from ldm.ledger.plan import memory_plan
    from optimizedSD.arguments import resolve_config
    from optimizedSD.images import load_init_image, output_size
    from optimizedSD.prompts import distinct, parse_prompt, read_prompts_file

    config = request.config or resolve_config(None)
    load_model_config(config)  # a bad config is the user's one-line error, before any simulation
    prompts = distinct(read_prompts_file(request.from_file) if request.from_file else [request.prompt])
    for text in (*prompts, request.negative_prompt):
        parse_prompt(text)
    init_image = load_init_image(request.init_img) if request.img2img else None
    height, width = output_size(request, init_image)
    attention = "sliced" if request.attention == "sliced" else "sdpa"  # auto means sdpa on CUDA
    shape = RunShape(height, width, request.n_samples, request.sampler, request.steps, request.scale, attention,
                     request.vae_tiling, request.unet_bs, request.img2img)
    card = gpu_bytes(request.gpu_memory_bytes)
    dtype = torch.float16 if request.precision == "autocast" else torch.float32
    return memory_plan(str(config), shape, dtype, budget_bytes=request.vram_budget_bytes, gpu_bytes=card,
                       calls=generation_stages(request, prompts, init_image), quantize=request.quantize,
                       tome=request.tome)
