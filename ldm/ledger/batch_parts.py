"""Bounded memory for large batches: how many of a batch's images sample together, and the grid's cap.

``--n_samples 10000`` would otherwise allocate every per-image tensor of the batch at once (start noise,
sampler state, two conditionings of ``[B, 77, D]``, the UNet's activations for ``2B`` rows). A batch larger
than the memory holds runs in parts of at most :func:`images_per_part` images, one after the other. Every
image has its own seed, its own noise generator and its own conditioning row, and the samplers and the
guidance act on each image alone, so the parts give the same images, file names and grid as one batch
(tested pixel for pixel).

The memory a part needs is ``fixed + images * per_image``, from the VRAM ledger (:mod:`ldm.ledger`): the run
simulated on the ``meta`` device for one and for two images; ``--unet_bs`` enters as the ledger's UNet chunk
(it bounds the activations, so only latents and conditionings grow with the part). The ledger costs about a
second per simulation, so it runs only when a crude upper bound (:func:`rough_bytes`) does not fit.
What is available: on a CPU, host memory (``MemAvailable``, a cgroup v2 ``memory.max``, ``RLIMIT_DATA``/``RLIMIT_AS``),
read before the kernel's OOM killer would have to act; on CUDA, the device's free memory plus what this run
already holds, against the ledger's peak with the weights the memory mode keeps there. When not even one image
fits, the run stops before sampling with one line that says what size would.

The grid: a grid holds every image of the run in host memory, twice (the images kept, then the grid).
Above :data:`MAX_GRID_PIXELS` it is not made, with one warning line; the images are written as usual.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from ldm.config import ModelConfig
from ldm.errors import UserError
from ldm.ledger.calls import generation_calls
from ldm.ledger.plan import plan_steps
from ldm.ledger.shapes import RunShape
from ldm.ledger.simulation import meta_stable_diffusion, simulate
from ldm.host_memory import host_available_bytes
from ldm.memory.estimates import HOST_RESERVE_BYTES, SAFETY, PartMemory, image_bytes, rough_bytes

log = logging.getLogger(__name__)

MAX_GRID_PIXELS = 2**26  # 64 Mpx, 192 MiB of 8-bit RGB: 256 images of 512x512


class BatchTooLarge(UserError):
    """Not even one image of this size fits the memory the run may use (one line, exit 2)."""


def ledger_bytes(cfg: ModelConfig, mode: str, height: int, width: int, dtype: torch.dtype, sampler: str,
                 attention: str, unet_bs: int | None, device: torch.device, tiled: bool,
                 quantize: str | None = None, tome: float | None = None, taesd: bool = False) -> PartMemory:
    """The VRAM ledger's count (weights apart) for parts of one and of two images: the per-image slope of the
    sampling, and the rest (the larger of the sampling's constant part and one image's decode)."""
    sd = meta_stable_diffusion(cfg, dtype, quantize, tome, taesd)  # the UNet as --quantize / --tome make it
    shape = RunShape(height, width, 1, sampler, plan_steps(sampler, 20), 7.5, attention, tiled, unet_bs)
    calls = generation_calls(first_tile_only=True)  # the run's stages; a tiled decode as its largest tile
    one, two = (simulate(sd, mode, replace(shape, batch=images), calls=calls) for images in (1, 2))
    per_image = max(0, two.phase_peaks["unet"].total - one.phase_peaks["unet"].total)
    fixed = max(0, one.peak.total - one.peak.weights - per_image) + image_bytes(height, width) * tiled
    return PartMemory(fixed, per_image, one.peak.weights if device.type == "cuda" else 0)


def device_available_bytes(device: torch.device) -> int | None:
    """Memory the run may use for a part: host memory on a CPU; on CUDA free device memory plus this process's
    own allocations (the weights: :class:`PartMemory` counts them); None elsewhere (no way to ask)."""
    if device.type == "cpu":
        return host_available_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    return None


@dataclass(frozen=True)
class PartQuery:
    """What decides a part's size: the model, the memory mode, the image size and the run's settings."""

    cfg: ModelConfig
    mode: str
    height: int
    width: int
    dtype: torch.dtype
    sampler: str
    attention: str
    unet_bs: int | None
    device: torch.device
    tiled: bool = False  # the decode runs in tiles (--vae_tiling, large images)
    quantize: str | None = None  # --quantize
    tome: float | None = None  # --tome
    weight_bytes: int = 0  # the models' weights: on CUDA the rough bound counts them all on the device
    taesd: bool = False  # --vae is a TAESD: its decode, not the KL VAE's


def images_per_part(query: PartQuery, images: int, extra_host_bytes: int = 0) -> int:
    """How many of a batch's ``images`` sample together (all of them when they fit). Raises
    :class:`BatchTooLarge` when not even one fits. ``extra_host_bytes``: what a CPU run keeps besides (the grid)."""
    available = device_available_bytes(query.device)
    if available is None:
        return images
    cpu = query.device.type == "cpu"
    available -= extra_host_bytes if cpu else 0
    rough = rough_bytes(query.cfg, query.height, query.width, query.dtype, query.unet_bs, 0 if cpu else query.weight_bytes)
    if rough.need(images) <= available:
        return images
    part = ledger_bytes(query.cfg, query.mode, query.height, query.width, query.dtype, query.sampler, query.attention,
                        query.unet_bs, query.device, query.tiled, query.quantize, query.tome, query.taesd)
    fitting = min(images, part.images_within(available))
    if fitting == 0:
        raise BatchTooLarge(_too_large(query, part, available))
    if fitting < images:
        where = "host" if query.device.type == "cpu" else "device"
        log.warning("%d images per batch: %.1f GiB of %s memory holds %d at a time, so each batch samples in %d parts "
                    "(the same images)", images, available / 2**30, where, fitting, -(-images // fitting))
    return fitting


def _too_large(query: PartQuery, part: PartMemory, available: int) -> str:
    """One line: what one image needs, what is available, and the largest size of the same shape that fits."""
    where = "host" if query.device.type == "cpu" else "device"
    scale = math.sqrt(max((available - HOST_RESERVE_BYTES) / SAFETY - part.weights, 0) / max(part.fixed + part.per_image, 1))
    fits = [max(64, int(side * scale) // 64 * 64) for side in (query.width, query.height)]
    return (f"one {query.width}x{query.height} image needs about {part.need(1) / 2**30:.1f} GiB of {where} memory "
            f"to sample and decode, {max(available, 0) / 2**30:.1f} GiB is available: about {fits[0]}x{fits[1]} fits"
            + ("" if query.unet_bs == 1 else " (--unet_bs 1 runs the UNet one row at a time)"))


def grid_fits(images: int, height: int, width: int) -> bool:
    """Whether the run's grid stays under :data:`MAX_GRID_PIXELS`; if not, says so in one warning line."""
    if images * height * width <= MAX_GRID_PIXELS:
        return True
    log.warning("no grid: %d images of %dx%d would make a %.0f Mpx grid, over the %d Mpx cap (the images are written "
                "as usual; --skip_grid silences this)", images, width, height, images * height * width / 1e6,
                MAX_GRID_PIXELS // 10**6)
    return False


def grid_host_bytes(images: int, height: int, width: int) -> int:
    """Host memory the grid takes at the end: every image kept in 8 bits, then the grid itself."""
    return 2 * 3 * images * height * width if images * height * width <= MAX_GRID_PIXELS else 0
