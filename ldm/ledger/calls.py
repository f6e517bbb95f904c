"""What the VRAM ledger runs: the generation stages themselves (:mod:`ldm.pipeline`), never a copy of them.

:func:`generation_calls` turns a request into the ledger's ``calls(sd, residency, shape, device, phase)``: the
run's prompts through :func:`~ldm.pipeline.encode.encode_prompts`, the init image's encode (img2img), the first
batch through :func:`~ldm.pipeline.sample.sample_batch` (and the hires fix's second pass,
:func:`~ldm.passes.hires.hires_pass`) and its images through
:func:`~ldm.pipeline.decode.decode_and_write`, each under its phase. ``--plan``, low mode's tiling rule, the
batch-parts planner and ``scripts/gpu_check.py`` (on a real GPU) all run it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ldm.control.units import meta_units
from ldm.memory.vae_decoding import DEFAULT_TILE
from ldm.passes.hires import hires_pass, hires_texts
from ldm.pipeline.batches import Batch, plan_batches
from ldm.pipeline.decode import ImageSink, decode_and_write, decode_image
from ldm.pipeline.encode import encode_prompts
from ldm.pipeline.model import LoadedModel
from ldm.pipeline.prepare import InitImage
from ldm.pipeline.request import IMG2IMG, TXT2IMG, GenerationRequest
from ldm.pipeline.sample import sample_batch
from ldm.samplers import sampler_record
from ldm.ledger.shapes import Calls, RunShape

PROMPT = "a prompt"  # what the ledger encodes when the run's prompts are not known (its size does not matter)
IMG2IMG_STRENGTH = 0.75


class Discard:
    """Where a simulated run's decoded images go: nowhere (an image on ``meta`` has no pixels to write)."""

    def pixels(self, decoded: torch.Tensor) -> np.ndarray:
        return np.zeros((0,), dtype=np.uint8)

    def add(self, batch: Batch, k: int, decoded: torch.Tensor) -> None:
        pass

    def add_pixels(self, batch: Batch, k: int, image: np.ndarray, safety: str | None = None) -> None:
        pass


def shape_request(shape: RunShape) -> GenerationRequest:
    """A request for ``shape`` with the scripts' defaults for everything the shape does not say."""
    return GenerationRequest(
        mode=IMG2IMG if shape.img2img else TXT2IMG, prompt=PROMPT, negative_prompt="", from_file=None, init_img=None,
        strength=IMG2IMG_STRENGTH if shape.img2img else None, height=shape.height, width=shape.width,
        prompt_syntax="fork", seed=0, n_samples=shape.batch, n_iter=1, steps=shape.steps, sampler=shape.sampler,
        eta=0.0, scale=shape.scale, fixed_code=False, ckpt=Path("meta"), vae=None, config=None, use_ema=False,
        loras=(), lora_dir=Path("."), device=torch.device("meta"), precision="autocast", vram="full",
        vram_budget_bytes=None, unet_bs=shape.unet_chunk, attention=shape.attention, vae_tiling=shape.tiled,
        embedding_cache=None, clip_skip=1, embeddings_dir=Path("/nonexistent/embeddings"), embeddings_dir_given=False,
        tome=0.0, quantize=None, outdir=Path("."), image_format="png", skip_grid=True, skip_save=True, n_rows=0,
        watermark=False,
    )


def simulated(sampler: str, device: torch.device) -> str:
    """The sampler run on ``device``: an adaptive one picks its steps from the values, which ``meta`` has none of,
    so there its steps are dpm_fast's (the same third-order DPM-Solver steps, on a fixed walk)."""
    record = sampler_record(sampler)
    return "dpm_fast" if device.type == "meta" and record.adaptive else sampler


def generation_calls(request: GenerationRequest | None = None, prompts: Sequence[str] = (PROMPT,),
                     init_image: Image.Image | None = None, *, first_tile_only: bool = False,
                     sink: ImageSink | None = None) -> Calls:
    """The stages of ``request`` (default: :func:`shape_request` of the simulated shape) as the ledger's calls.
    The shape simulated (size, batch, sampler, steps, guidance, chunk, tiling) overrides the request's.
    ``first_tile_only``: decode only the first image's largest tile (a tiled decode runs its tiles one after the
    other, and simulating all of them on ``meta`` takes minutes at 8192 px). ``sink``: where decoded images go
    (default: nowhere; a run on a real device may keep them)."""

    def calls(sd, residency, shape: RunShape, device: torch.device, phase) -> None:
        dtype = next(sd.unet.parameters()).dtype
        run = replace(
            request or shape_request(shape), device=device, precision="full" if dtype == torch.float32 else "autocast",
            height=shape.height, width=shape.width, n_samples=shape.batch, sampler=simulated(shape.sampler, device),
            steps=shape.steps,
            scale=shape.scale, unet_bs=shape.unet_chunk, embedding_cache=None, skip_save=True, skip_grid=True,
        )
        if id(residency) not in prepared:  # a caller that did not prepare (a real device): built now
            prepare(sd, residency, shape)
        control = prepared.pop(id(residency))
        model = LoadedModel(sd, residency, sd.schedule, control=control)
        with phase("text_encoder"):
            encoder = encode_prompts(run, [*prompts, *hires_texts(run)], model)
        init = None
        if shape.img2img:
            with phase("vae"):
                image = init_image or Image.new("RGB", (shape.width, shape.height))
                init = InitImage.encode(image, shape.width, shape.height, model, run.dtype, shape.tiled)
        factor = sd.config.downsampling_factor
        latent_shape = (sd.config.latent_channels, shape.height // factor, shape.width // factor)
        batch = next(plan_batches(run, prompts))
        with phase("unet"):
            latents = sample_batch(run, model, encoder, init, batch, latent_shape)
        if run.hires is not None:  # the hires fix's second pass, at its size (its upscale's VAE work under "vae")
            latents = hires_pass(run, model, encoder, batch, latents, phase=phase, tiled=shape.tiled)
        with phase("vae"):
            if first_tile_only:
                side = 2 * DEFAULT_TILE if shape.tiled else None  # a tile with its overlap is at most twice the tile
                decode_image(residency, latents[:1, :, :side, :side], sd.scale_factor, False, None)
            else:
                decode_and_write(model, batch, latents, shape.tiled, sink or Discard())

    prepared: dict[int, tuple] = {}

    def prepare(sd, residency, shape: RunShape) -> dict[int, tuple]:
        """One ControlNet of the config's architecture per ``--control_model``, on ``meta`` (no file is read),
        under ``residency``: built before the counting starts (:func:`~ldm.ledger.simulation.simulate` calls
        this first), since a model built on ``meta`` stands for host copies, not device memory."""
        count = len(request.control) if request is not None else 0
        dtype = next(sd.unet.parameters()).dtype
        prepared[id(residency)] = meta_units(count, sd.config, dtype, residency, shape.width, shape.height)
        return prepared

    calls.prepare = prepare
    return calls
