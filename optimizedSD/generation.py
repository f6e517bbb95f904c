"""The generation loop shared by ``optimized_txt2img.py`` and ``optimized_img2img.py``.

One run: read and check everything the user gave (prompts, init image, output folder, config, checkpoint
path), load the model once, encode every distinct prompt once, then for each iteration and each prompt
sample a batch of ``n_samples`` latents and decode and write them one image at a time (so images already
written stay when a later one fails, and the VAE decodes one image's activations at a time).

Seeds: image ``k`` of a run (counting across the batch, the prompts and the iterations, in the order the
files are written) has seed ``seed + k``; its start noise is ``torch.randn((1, 4, H/8, W/8))`` from a CPU
generator seeded with that number (:class:`ldm.noise.SeededNoise`), so ``--seed seed+k --n_samples 1``
reproduces it alone. For img2img the same generator then draws the VAE posterior sample of the init image,
then the ancestral samplers' fresh noise. ``--fixed_code`` (as CompVis and the fork: one start code reused):
every batch uses the first batch's seeds, so image k of each batch has seed ``seed + k``.

Memory: which model sits on the device when is :class:`ldm.residency.Residency`'s business
(``--vram``/``--turbo``/``--vram_budget``); this loop only says which model it needs next.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from optimizedSD.arguments import IMG2IMG, LATENT_FACTOR, UsageError
from optimizedSD.outputs import SampleWriter, Watermarker, infotext, model_hash, prompt_folder_name, to_uint8
from optimizedSD.prompts import EmbeddingCache, PromptEncoder, checkpoint_fingerprint, distinct, parse_prompt, read_prompts_file

log = logging.getLogger(__name__)

WEIGHTS_HELP = "see models/README.md for where to get Stable Diffusion v1 weights, or pass --ckpt"


@dataclass
class RunSummary:
    """What a run did (returned by :func:`generate`, printed by the scripts)."""

    written: list[Path] = field(default_factory=list)
    grid: Path | None = None
    images: int = 0
    seconds: float = 0.0
    first_seed: int = 0
    peak_vram_bytes: int | None = None

    def line(self) -> str:
        per_image = self.seconds / self.images if self.images else float("nan")
        text = f"{self.images} images in {self.seconds:.1f} s ({per_image:.2f} s/image)"
        if self.written:
            folders = sorted({str(p.parent) for p in self.written})
            text += f", written to {folders[0]}" + (f" and {len(folders) - 1} more folders" if len(folders) > 1 else "")
        if self.grid is not None:
            text += f", grid {self.grid}"
        if self.peak_vram_bytes is not None:
            text += f", peak VRAM {self.peak_vram_bytes / 2**30:.2f} GiB"
        return text


def load_init_image(path: str | Path) -> Image.Image:
    """Any image Pillow opens, as RGB (EXIF rotation applied; palette and alpha images flattened)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"init image not found: {path}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("P", "PA", "LA", "La", "RGBa"):
                image = image.convert("RGBA")  # palette transparency survives only through RGBA
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read init image {path}: {error}") from None


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> ``[1, 3, H, W]`` float32 in [-1, 1], resized with LANCZOS when its size differs."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def model_dtype(device: torch.device, precision: str) -> torch.dtype:
    """``autocast`` means fp16 weights on CUDA (as the fork's ``model.half()``); fp32 on CPU and MPS."""
    return torch.float16 if precision == "autocast" and device.type == "cuda" else torch.float32


def _chunked_unet(unet: Callable, chunk: int | None) -> Callable:
    """The fork's ``--unet_bs``: call the UNet on at most ``chunk`` latents at a time."""
    from ldm.residency import StreamedUNet

    if not chunk:
        return unet
    if isinstance(unet, StreamedUNet):  # chunks inside one streamed pass, not one pass per chunk
        return lambda x, t, context: unet(x, t, context, chunk)

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= chunk:
            return unet(x, t, context)
        return torch.cat([unet(x[i : i + chunk], t[i : i + chunk], context[i : i + chunk]) for i in range(0, x.shape[0], chunk)])

    return call


class Progress:
    """A tqdm bar over a sampler's steps (the samplers report ``callback(step, total, x)``)."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, step: int, total: int, x: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, leave=False, unit="step")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_checkpoint_path(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}; {WEIGHTS_HELP}")
    if not path.is_file():
        raise UsageError(f"checkpoint is not a file: {path}; {WEIGHTS_HELP}")


def generate(opt: argparse.Namespace) -> RunSummary:
    """Run the scripts' job for parsed and checked options (see :func:`optimizedSD.arguments.parse_args`)."""
    # Imported here so that `--help` and argument errors answer without loading torch's model code.
    from ldm import samplers
    from ldm.checkpoint_file import CheckpointError
    from ldm.config import ConfigError, load_model_config
    from ldm.guidance import GuidedDenoiser
    from ldm.model_loading import load_stable_diffusion
    from ldm.noise import SeededNoise
    from ldm.schedule import DiffusionSchedule
    from ldm.vae_decoding import should_tile

    started = time.perf_counter()
    img2img = opt.mode == IMG2IMG

    # ---- 1. everything the user gave, checked before the (slow) model load -------------------------------
    prompts = read_prompts_file(opt.from_file) if opt.from_file else [opt.prompt]
    for text in (*distinct(prompts), opt.negative_prompt):
        parse_prompt(text)  # weights summing to zero fail now, not after loading
    init_image = load_init_image(opt.init_img) if img2img else None
    height = opt.H if opt.H is not None else init_image.height // LATENT_FACTOR * LATENT_FACTOR
    width = opt.W if opt.W is not None else init_image.width // LATENT_FACTOR * LATENT_FACTOR
    if height <= 0 or width <= 0:
        raise UsageError(f"init image {opt.init_img} is {init_image.width}x{init_image.height}; "
                         f"give --H/--W or an image at least {LATENT_FACTOR} px on each side")
    writer = SampleWriter(Path(opt.outdir), opt.format, None if opt.no_watermark else Watermarker())
    writer.prepare(".")
    try:
        cfg = load_model_config(opt.config)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if opt.ddim_steps > cfg.schedule.timesteps:
        raise UsageError(f"--ddim_steps must be at most {cfg.schedule.timesteps}, got {opt.ddim_steps}")
    ckpt = Path(opt.ckpt)
    _check_checkpoint_path(ckpt)

    device: torch.device = opt.device
    dtype = model_dtype(device, opt.precision)
    print(f"Seed: {opt.seed}" + (" (fixed code: every batch starts from the first batch's noise)" if opt.fixed_code else ""))

    # ---- 2. the model, once ------------------------------------------------------------------------------
    log.info("loading %s", ckpt)
    try:
        sd = load_stable_diffusion(ckpt, cfg, dtype=dtype, use_ema=opt.use_ema)
    except CheckpointError as error:  # its message names the file
        raise UsageError(f"{error} ({WEIGHTS_HELP})") from None
    residency = _make_residency(opt, sd, device, height, width)
    hash_ = None if opt.skip_save else model_hash(ckpt)  # sha256 of the whole file: only for the metadata
    schedule = DiffusionSchedule.from_alphas_cumprod(sd.alphas_cumprod)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    summary = RunSummary(first_seed=opt.seed)
    grid_images: list[np.ndarray] = []
    try:
        # ---- 3. text encodings: each distinct (sub-)prompt once; from the disk cache when there ---------
        cache = None
        if opt.embedding_cache:
            try:
                cache = EmbeddingCache(opt.embedding_cache, checkpoint_fingerprint(ckpt), dtype)
            except OSError as error:
                raise UsageError(f"cannot use --embedding_cache {opt.embedding_cache}: {error}") from None
        encoder = PromptEncoder(cache)
        needed = distinct(prompts) + ([opt.negative_prompt] if opt.scale != 1.0 else [])
        if encoder.missing(needed):
            with residency.use("text_encoder") as text_encoder:
                encoder.encode_missing(needed, text_encoder.encode)

        # ---- 4. img2img: the init image's posterior, once --------------------------------------------------
        posterior = None
        if img2img:
            pixels = image_to_tensor(init_image, width, height)
            with residency.use("vae") as vae, torch.no_grad():
                posterior = vae.encode(pixels.to(device=device, dtype=dtype))

        # ---- 5. sample, decode, write ------------------------------------------------------------------------
        batch = opt.n_samples
        tiled = should_tile(height, width, opt.vae_tiling)
        latent_shape = (cfg.latent_channels, height // cfg.downsampling_factor, width // cfg.downsampling_factor)
        image_index = 0
        for iteration in tqdm(range(opt.n_iter), desc="Iterations"):
            for prompt in tqdm(prompts, desc="Prompts", leave=False, disable=len(prompts) == 1):
                seeds = [opt.seed + image_index + k for k in range(batch)]
                noise_seeds = [opt.seed + k for k in range(batch)] if opt.fixed_code else seeds
                cond = encoder.batch(prompt, batch, device, dtype)
                uncond = encoder.batch(opt.negative_prompt, batch, device, dtype) if opt.scale != 1.0 else None

                def run_batch() -> torch.Tensor:
                    # Fresh generators on every try, so a retry after out-of-memory draws the same noise.
                    noise = SeededNoise(noise_seeds)
                    x_T = noise.initial(latent_shape, device=device)
                    init_latent = None
                    if posterior is not None:  # the image's generator draws its posterior sample next
                        init_latent = sd.scale_factor * posterior.sample(noise(x_T)).float()
                    return _sample(samplers, GuidedDenoiser, residency, opt, cond, uncond, schedule, x_T,
                                   init_latent, noise, img2img)

                latents = _with_oom_retry(residency, run_batch)
                for k in range(batch):
                    decoded = _decode_with_retry(residency, latents[k : k + 1], sd.scale_factor, tiled)
                    image = to_uint8(decoded)[0]
                    seed = noise_seeds[k]
                    summary.images += 1
                    if not opt.skip_grid:
                        grid_images.append(image)
                    if not opt.skip_save:
                        text = infotext(
                            prompt, opt.negative_prompt if uncond is not None else "", steps=opt.ddim_steps, sampler=opt.sampler,
                            scale=opt.scale, seed=seed, width=width, height=height, model_hash=hash_,
                            model_name=ckpt.stem, strength=opt.strength if img2img else None, eta=opt.ddim_eta,
                        )
                        summary.written.append(writer.write_sample(prompt_folder_name(prompt), seed, image, text))
                image_index += batch
        if grid_images:
            summary.grid = writer.write_grid(grid_images, opt.n_rows, None)
    finally:
        residency.release()
    summary.seconds = time.perf_counter() - started
    if device.type == "cuda":
        summary.peak_vram_bytes = torch.cuda.max_memory_allocated(device)
    return summary


def _sample(samplers, GuidedDenoiser, residency, opt, cond, uncond, schedule, x_T, init_latent, noise, img2img):
    """One batch of latents: the guided UNet under the chosen sampler, with a tqdm bar over the steps."""
    progress = Progress(f"Sampling ({opt.sampler})")
    try:
        with residency.use("unet") as unet, torch.no_grad():
            eps_model = GuidedDenoiser(_chunked_unet(unet, opt.unet_bs), cond, uncond, opt.scale)
            return samplers.sample(
                opt.sampler, eps_model, schedule, x_T, opt.ddim_steps,
                eta=opt.ddim_eta,
                init_latent=init_latent,
                strength=opt.strength if img2img else 1.0,
                noise_sampler=noise,
                callback=progress,
            )
    finally:
        progress.close()


def _slice_attention() -> bool:
    """The last resort when the lowest memory mode ran out: attention in query slices (only helps where the
    fused kernel falls back to building the whole score matrix). False if it is sliced already."""
    from ldm.attention import get_attention_backend, set_attention_backend

    if get_attention_backend().name == "sliced":
        return False
    set_attention_backend("sliced")
    log.warning("out of device memory in the lowest mode: retrying with sliced attention")
    return True


def _decode(residency, latent: torch.Tensor, scale_factor: float, tiled: bool, tile: int | None = None) -> torch.Tensor:
    """One image's latent -> pixels in [-1, 1]; in overlapping tiles with ``--vae_tiling`` or for large images,
    and again in fp32 if the fp16 VAE overflows."""
    from ldm.vae_decoding import DEFAULT_TILE, decode_latents

    with residency.use("vae") as vae, torch.no_grad():
        return decode_latents(vae, latent / scale_factor, tiled, tile or DEFAULT_TILE)


def _decode_with_retry(residency, latent: torch.Tensor, scale_factor: float, tiled: bool) -> torch.Tensor:
    """``_decode`` with its own out-of-memory ladder: in full mode the UNet and text encoder leave the
    device first (medium mode); then 256 px tiles (their seams blend; a picture with slightly different
    GroupNorm statistics beats no picture); then sliced attention for this decode only. Stepping the UNet
    further down would not help: medium and low both hold the VAE alone while it decodes."""
    from ldm.attention import get_attention_backend, set_attention_backend
    from ldm.residency import is_out_of_memory
    from ldm.vae_decoding import SMALL_TILE

    tile, backend = None, get_attention_backend()
    try:
        while True:
            try:
                return _decode(residency, latent, scale_factor, tiled, tile)
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                failure = error.with_traceback(None)  # frees the failed try's activations (see _with_oom_retry)
            if residency.mode == "full":
                residency.step_down()
            elif tile != SMALL_TILE:
                tiled, tile = True, SMALL_TILE
                log.warning("out of device memory decoding: decoding in %d px tiles instead", SMALL_TILE * 8)
            elif get_attention_backend().name != "sliced":
                set_attention_backend("sliced")
                log.warning("out of device memory decoding in tiles: retrying with sliced attention")
            else:
                raise failure
            del failure
    finally:
        set_attention_backend(backend.name, backend.slice_size)


def _with_oom_retry(residency, step: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``step`` (one batch's sampling, which writes nothing); on CUDA out-of-memory drop to a lower memory
    mode (after the lowest, to sliced attention) and run it again."""
    from ldm.residency import is_out_of_memory

    while True:
        try:
            return step()
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            # Drop the traceback: its frames hold the failed try's activations, which must be freed before
            # the device is emptied and the batch runs again.
            failure = error.with_traceback(None)
        if not residency.step_down() and not _slice_attention():
            raise failure
        del failure


def resolve_attention(name: str, device: torch.device) -> str:
    """``--attention auto``: PyTorch's fused attention where it has memory-efficient kernels (CUDA, CPU);
    slices on MPS, whose fused attention builds the whole score matrix (diffusers and A1111 slice there too)."""
    if name != "auto":
        return name
    return "sliced" if device.type == "mps" else "sdpa"


def _make_residency(opt: argparse.Namespace, sd, device: torch.device, height: int, width: int):
    """The memory mode (``--vram``, ``--turbo``, ``--vram_budget``) and attention backend (``--attention``)."""
    from ldm.attention import set_attention_backend
    from ldm.residency import Residency, auto_budget_bytes, resolve_mode
    from ldm.vae_decoding import should_tile

    set_attention_backend(resolve_attention(opt.attention, device))
    dtype = next(sd.unet.parameters()).dtype
    tiled = should_tile(height, width, opt.vae_tiling)
    mode = resolve_mode(opt.vram, device, height, width, opt.n_samples, sd=sd, dtype=dtype, tiled=tiled)
    if opt.vram_budget is not None:
        budget = int(opt.vram_budget * 2**30)
    elif opt.vram == "auto" and mode == "low":
        budget = auto_budget_bytes(device, height, width, opt.n_samples, sd=sd, dtype=dtype)
    else:
        budget = None
    try:
        residency = Residency(sd, device, mode=mode, budget_bytes=budget)
    except ValueError as error:  # e.g. a --vram_budget too small for the largest block
        raise UsageError(str(error)) from None
    log.info("memory mode %s on %s", mode, device)  # after pinning, which the benchmark counts as loading
    return residency
