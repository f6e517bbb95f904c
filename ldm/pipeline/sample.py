"""The sample stage: one batch's noise and conditioning, then the guided UNet under the chosen sampler, run
again one memory mode lower after out of memory (:func:`ldm.memory.out_of_memory.retry_lower`, with the same
noise).

Noise: each image's start noise is ``torch.randn((1, 4, H/8, W/8))`` from a generator seeded with its seed
(:class:`ldm.samplers.noise.SeededNoise`: ``--rng``, variation seeds, seed resize); for img2img the same
generator (or, with ``--ensd``, one seeded with seed + ENSD) then draws the VAE posterior sample of the init
image, then the ancestral samplers' fresh noise; the SDE samplers' Brownian trees are seeded with the seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldm import samplers
from ldm.conditioning.prompts import PromptEncoder
from ldm.memory.deep_cache import counting_steps, deep_cached, unet_deep_cache
from ldm.control.controlled import controlled_unet
from ldm.memory.out_of_memory import retry_lower
from ldm.memory.residency import Residency
from ldm.memory.streaming import chunked_unet
from ldm.pipeline.batches import Batch, BatchStart
from ldm.pipeline.inpainting import blend_then
from ldm.pipeline.input_checks import check_conditioning
from ldm.pipeline.model import LoadedModel
from ldm.pipeline.request import GenerationRequest
from ldm.samplers.guidance import GuidedDenoiser
from ldm.samplers.noise import SeededNoise
from ldm.samplers.schedule import DiffusionSchedule

StepCallback = Callable[[int, int, torch.Tensor], object]
"""``progress(step, total, x)`` after each sampling step (the scripts' progress bar)."""


@dataclass(frozen=True)
class GuidedInputs:
    """The conditioning of a batch: prompt and (when guided) negative prompt, ``[B, 77 * chunks, D]`` each."""

    cond: torch.Tensor
    uncond: torch.Tensor | None


def sample_batch(request: GenerationRequest, model: LoadedModel, encoder: PromptEncoder, init, batch: Batch,
                 latent_shape: tuple[int, ...], progress: StepCallback | None = None) -> torch.Tensor:
    """One batch's latents; ``init``: the run's input preparer (:mod:`ldm.pipeline.prepare`) or None."""
    device, dtype, size = request.device, request.dtype, len(batch.seeds)
    negative = request.negative_prompt if request.guided else None
    length = encoder.context_length(batch.prompt, *([negative] if negative is not None else []))
    cond = encoder.batch(batch.prompt, size, device, dtype, length)  # long prompts: 77 tokens a chunk
    uncond = encoder.batch(negative, size, device, dtype, length) if negative is not None else None
    check_conditioning(cond, "prompt")  # NaN here (fp16 overflow, a bad cache entry) is a black image
    if uncond is not None:
        check_conditioning(uncond, "negative prompt")

    def attempt() -> torch.Tensor:
        noise = batch_noise(request, batch)  # fresh generators on every try: a retry draws the same noise
        x_T = noise.initial(latent_shape, device=device)
        start = BatchStart()
        if init is not None:  # each image's generator draws its posterior samples right after its x_T
            start = init.start(noise, x_T, model.sd.scale_factor, sampler=request.sampler, schedule=model.schedule,
                               steps=request.steps, strength=request.strength, schedule_type=request.schedule,
                               img2img_steps=request.img2img_steps)
        return run_sampler(request, model.residency, model.schedule, GuidedInputs(cond, uncond), x_T, start, noise,
                           progress, control=model.control, engine=model.unet_engine)

    return retry_lower(model.residency, attempt)


def batch_noise(request: GenerationRequest, batch: Batch) -> SeededNoise:
    """The batch's generators: the request's RNG mode, variation seeds, seed resize and ENSD."""
    return SeededNoise(batch.seeds, request.rng, subseeds=batch.subseeds, subseed_strength=request.subseed_strength,
                       seed_resize_from=request.seed_resize_from, ensd=request.ensd)


def run_sampler(request: GenerationRequest, residency: Residency, schedule: DiffusionSchedule, guided: GuidedInputs,
                x_T: torch.Tensor, start: BatchStart, noise: SeededNoise,
                progress: StepCallback | None = None, control=(), engine=None) -> torch.Tensor:
    """The guided UNet (steered by the ``control`` units' ControlNets) under the chosen sampler (``--unet_bs``
    chunks), the preparer's per-step hook after each step, then ``progress``; ``engine`` (``--backend
    openvino``'s UNet) runs instead of the residency's."""
    with (engine.in_use() if engine is not None else residency.use("unet")) as unet, torch.no_grad():
        strength = request.strength if request.img2img else 1.0
        steps = len(samplers.walk_levels(request.sampler, schedule, request.steps, strength, request.schedule,
                                         request.img2img_steps)) - 1
        cache = unet_deep_cache(unet, request.deepcache, request.deepcache_branch) if request.deepcache else None
        unet = unet if cache is None else deep_cached(unet, cache)  # --deepcache: shallow steps between whole ones
        unet = controlled = controlled_unet(unet, control, steps)
        unet = start.wrap_unet(chunked_unet(unet, request.unet_bs))
        eps_model = GuidedDenoiser(unet, guided.cond, guided.uncond, request.scale)
        callback = progress if start.after_step is None else blend_then(start.after_step, progress)
        if control:
            callback = controlled.count_steps(callback)
        callback = callback if cache is None else counting_steps(cache, callback)
        try:
            return samplers.sample(
                request.sampler, eps_model, schedule, x_T, request.steps, eta=request.eta,
                ancestral_eta=request.eta_ancestral, init_latent=start.init_latent,
                strength=request.strength if request.img2img else 1.0, noise_sampler=noise, callback=callback,
                schedule_type=request.schedule, img2img_steps=request.img2img_steps,
            )
        finally:
            if control:
                controlled.release()
