"""A run's batches, their parts, and what an input preparer gives a batch to start from.

Seeds: image ``k`` of a run (counting across the batch, the prompts and the iterations, in the order the
files are written) has seed ``seed + k``, so ``--seed seed+k --n_samples 1`` reproduces it alone;
``--fixed_code`` (as CompVis and the fork: one start code reused) gives every batch the first batch's seeds.
With a variation strength (``--subseed_strength``), as the webui, every image has ``seed`` and image ``k`` the
variation seed ``subseed + k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ldm.pipeline.request import GenerationRequest


@dataclass(frozen=True)
class Batch:
    """One UNet batch: ``iteration`` and ``prompt_index`` place it in the run; ``seeds`` name its images
    and seed their noise (with ``--fixed_code``, the first batch's seeds again)."""

    iteration: int
    prompt_index: int
    prompt: str
    seeds: tuple[int, ...]
    first_image: int = 0  # the run-wide index of the batch's first image (the order files are written in)
    subseeds: tuple[int, ...] = ()  # the images' variation seeds (with --subseed_strength), else empty


def plan_batches(request: GenerationRequest, prompts: Sequence[str]) -> Iterator[Batch]:
    """The run's batches in the order their files are written: iterations, then prompts. (A batch larger than
    the memory holds samples in parts: :func:`batch_parts`.)"""
    size = request.n_samples
    first_image = 0
    vary = request.subseed_strength != 0
    for iteration in range(request.n_iter):
        for index, prompt in enumerate(prompts):
            start = 0 if request.fixed_code else first_image
            seeds = tuple(request.seed + (0 if vary else start + k) for k in range(size))
            subseeds = tuple(request.subseed + start + k for k in range(size)) if vary else ()
            yield Batch(iteration, index, prompt, seeds, first_image, subseeds)
            first_image += size


def batch_parts(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` as consecutive parts of at most ``size`` images, each with its own seeds and place in the run
    (the same images as the whole batch: each image's noise, conditioning and sampling are its own)."""
    for start in range(0, len(batch.seeds), size):
        yield Batch(batch.iteration, batch.prompt_index, batch.prompt, batch.seeds[start : start + size],
                    batch.first_image + start, batch.subseeds[start : start + size])


@dataclass(frozen=True)
class BatchStart:
    """What an input preparer (``InitImage``, ``InpaintingInputs``) gives one batch: the init latent, a wrapper
    around the (chunked) UNet (the inpainting UNet's extra channels) and a per-step hook on the latent,
    ``after_step(step, total, x) -> x`` (the known region's blend)."""

    init_latent: torch.Tensor | None = None
    wrap_unet: Callable = lambda unet: unet
    after_step: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None
