"""txt2img's hires fix, as AUTOMATIC1111's webui v1.10 makes it (``modules/processing.py``:
``StableDiffusionProcessingTxt2Img.calculate_target_resolution`` and ``sample_hr_pass``;
``modules/sd_samplers_common.setup_img2img_steps``; ``sd_samplers_kdiffusion.sample_img2img``).

1. The first pass: txt2img at ``W x H`` (the run's request, unchanged).
2. The target: ``int(W * scale) x int(H * scale)``, or ``--hires_resize W'xH'`` (one side 0 keeps the aspect; both
   given, the picture is upscaled to cover them and the latents cropped to them, centred: ``truncate``).
3. The upscale: a latent upscaler interpolates the latents to ``(H' // 8, W' // 8)``; a pixel upscaler decodes
   each image, takes it to 8 bits, resizes it (:mod:`ldm.passes.upscalers`) and encodes it again, taking the VAE
   posterior's mean (the webui samples it from the global generator, which no seed reproduces; the mean is
   deterministic).
4. The second pass: img2img from those latents at the target size, the first pass's seeds (and variation seeds,
   seed resize) drawing fresh noise at the new size (new generators: :class:`~ldm.samplers.noise.SeededNoise`),
   exactly ``N`` steps (``--hires_steps``, 0: the first pass's) on the tail of the walk for ``int(N /
   min(D, 0.999))`` steps (:data:`~ldm.samplers.HIRES_STEPS`), starting from ``latents + sigma_0 * noise``; the
   ancestral samplers' noise continues the new generators. Its sampler, schedule and prompts are the first pass's
   unless the options name others.

The second pass is the pipeline's own img2img (:func:`~ldm.pipeline.sample.sample_batch` with a request derived
by :func:`hires_request`), so it runs under the same memory mode and out-of-memory ladder, and the VRAM ledger
counts it by running this code.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from ldm.conditioning.prompts import PromptEncoder
from ldm.errors import UsageError
from ldm.memory.out_of_memory import decode_with_retry
from ldm.memory.vae_decoding import should_tile
from ldm.passes.upscalers import find_upscaler, to_webui_uint8, upscale_latents, upscale_pixels
from ldm.pipeline.batches import Batch, BatchStart
from ldm.pipeline.decode import decode_one
from ldm.pipeline.images import image_to_tensor
from ldm.pipeline.model import LoadedModel
from ldm.pipeline.prepare import encode_images
from ldm.pipeline.request import IMG2IMG, SIZE_MULTIPLE, GenerationRequest, HiresOptions
from ldm.pipeline.sample import StepCallback, sample_batch
from ldm.samplers import HIRES_STEPS, sampler_record

LATENT_FACTOR = 8  # px per latent cell (the webui's opt_f)


@dataclass(frozen=True)
class HiresTarget:
    """Where the first pass's picture is upscaled to (``upscale_width x upscale_height`` px) and how many latent
    columns and rows are then cut off, half on each side (the webui's ``truncate_x``/``truncate_y``)."""

    upscale_width: int
    upscale_height: int
    truncate_x: int = 0
    truncate_y: int = 0

    @property
    def width(self) -> int:
        """The final picture's width in px."""
        return self.upscale_width - LATENT_FACTOR * self.truncate_x

    @property
    def height(self) -> int:
        return self.upscale_height - LATENT_FACTOR * self.truncate_y


def hires_target(width: int, height: int, options: HiresOptions) -> HiresTarget:
    """The webui's ``calculate_target_resolution`` for a first pass of ``width x height`` px."""
    if options.resize is None or options.resize == (0, 0):
        return HiresTarget(int(width * options.scale), int(height * options.scale))
    resize_x, resize_y = options.resize
    if resize_y == 0:
        return HiresTarget(resize_x, resize_x * height // width)
    if resize_x == 0:
        return HiresTarget(resize_y * width // height, resize_y)
    if width / height < resize_x / resize_y:
        upscale = (resize_x, resize_x * height // width)
    else:
        upscale = (resize_y * width // height, resize_y)
    return HiresTarget(*upscale, (upscale[0] - resize_x) // LATENT_FACTOR, (upscale[1] - resize_y) // LATENT_FACTOR)


def checked_target(width: int, height: int, options: HiresOptions) -> HiresTarget:
    """:func:`hires_target`, refused in one line unless the final picture's sides are multiples of 64 px (the
    UNet's) no larger than 8192."""
    target = hires_target(width, height, options)
    for side, name in ((target.width, "width"), (target.height, "height")):
        if side <= 0 or side % SIZE_MULTIPLE or side > 8192:
            raise UsageError(f"the hires fix makes {width}x{height} into {target.width}x{target.height}: its {name} "
                             f"must be a positive multiple of {SIZE_MULTIPLE} up to 8192 (pick another "
                             "--hires_scale or --hires_resize)")
    return target


def hires_request(request: GenerationRequest) -> GenerationRequest:
    """The second pass as an img2img request: the target size, ``--hires_*`` settings, the webui's step rule."""
    options = request.hires
    target = hires_target(request.width, request.height, options)
    sampler = options.sampler or request.sampler
    return replace(
        request, mode=IMG2IMG, strength=options.strength, steps=options.steps or request.steps, sampler=sampler,
        schedule=options.schedule or request.schedule, img2img_steps=HIRES_STEPS, width=target.width,
        height=target.height, negative_prompt=request.negative_prompt if options.negative_prompt is None
        else options.negative_prompt, eta=request.eta if sampler_record(sampler).takes_eta else 0.0, hires=None,
    )


def hires_texts(request: GenerationRequest) -> list[str]:
    """The second pass's own prompts, to be encoded with the first pass's (none without a hires fix)."""
    options = request.hires
    if options is None:
        return []
    texts = [options.prompt] if options.prompt is not None else []
    if options.negative_prompt is not None and request.guided:
        texts.append(options.negative_prompt)
    return texts


@dataclass
class UpscaledLatents:
    """The second pass's input preparer: every batch starts from the upscaled first-pass latents."""

    latents: torch.Tensor

    def start(self, noise, x_T: torch.Tensor, scale_factor: float, **walk) -> BatchStart:
        return BatchStart(self.latents.to(device=x_T.device, dtype=torch.float32))


def upscale(request: GenerationRequest, model: LoadedModel, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """The first pass's latents at the target size: interpolated (latent upscalers) or decoded, resized in 8 bits
    and encoded (pixel upscalers; the posterior's mean; in tiles with ``tiled``, which gives the same mean), then
    cropped by the target's truncation."""
    options = request.hires
    target = hires_target(request.width, request.height, options)
    upscaler = find_upscaler(options.upscaler)
    size = (target.upscale_height // LATENT_FACTOR, target.upscale_width // LATENT_FACTOR)
    if upscaler.latent:
        upscaled = upscale_latents(latents, upscaler, *size)
    else:
        upscaled = torch.cat([reencoded(request, model, latents[k : k + 1], upscaler, target, tiled)
                              for k in range(latents.shape[0])])
    ty, tx = target.truncate_y, target.truncate_x
    return upscaled[:, :, ty // 2 : upscaled.shape[2] - (ty + 1) // 2, tx // 2 : upscaled.shape[3] - (tx + 1) // 2]


def reencoded(request: GenerationRequest, model: LoadedModel, latent: torch.Tensor, upscaler,
              target: HiresTarget, tiled_encode: bool = False) -> torch.Tensor:
    """One image's latent decoded, to 8 bits, resized by a pixel upscaler and encoded (the posterior's mean; in
    tiles with ``tiled_encode``: :mod:`ldm.memory.vae_encoding`)."""
    residency, scale_factor = model.residency, model.sd.scale_factor
    tiled = should_tile(request.height, request.width, request.vae_tiling)
    decoded = decode_with_retry(residency, lambda tiled, tile: decode_one(model, latent, tiled, tile), tiled)[0]
    if decoded.device.type == "meta":  # the ledger: no pixels, the encoder's shapes are what count
        pixels = torch.zeros((1, 3, target.upscale_height, target.upscale_width))
    else:
        pixels = image_to_tensor(upscale_pixels(to_webui_uint8(decoded), upscaler, target.upscale_width,
                                                target.upscale_height), target.upscale_width, target.upscale_height)
    del decoded
    (posterior,) = encode_images(model, [pixels], request.dtype, tiled_encode)
    return scale_factor * posterior.mean.float()


def hires_pass(request: GenerationRequest, model: LoadedModel, encoder: PromptEncoder, batch: Batch,
               latents: torch.Tensor, progress: StepCallback | None = None, phase=None,
               tiled: bool = False) -> torch.Tensor:
    """The second pass over one batch's first-pass ``latents``: their latents at the target size. ``phase``:
    the ledger's ``phase(name)`` context for the upscale's VAE work and the sampling (default: none); ``tiled``:
    a pixel upscaler's encode at the target size runs in tiles (as the final pictures' decode does)."""
    phase = phase or (lambda name: nullcontext())
    second = hires_request(request)
    with phase("vae" if not find_upscaler(request.hires.upscaler).latent else "unet"):
        init = UpscaledLatents(upscale(request, model, latents, tiled))
    if request.hires.prompt is not None:
        batch = replace(batch, prompt=request.hires.prompt)
    channels = model.sd.config.latent_channels
    shape = (channels, second.height // LATENT_FACTOR, second.width // LATENT_FACTOR)
    with phase("unet"):
        return sample_batch(second, model, encoder, init, batch, shape, progress)


def final_size(request: GenerationRequest, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` of the pictures a run writes: the hires target, or the first pass's size."""
    if request.hires is None:
        return height, width
    target = hires_target(width, height, request.hires)
    return target.height, target.width
