"""The generation loop shared by ``optimized_txt2img.py``, ``optimized_img2img.py`` and ``optimized_inpaint.py``,
as a list of stages.

:func:`generate` reads like diffusers' ``__call__``::

    inputs = check_inputs(request)              # prompts, init image, size, output folder, config, checkpoint
    model = load_model(request, inputs)         # the checkpoint, once; its memory mode
    encoder = encode_prompts(...)               # every distinct (sub-)prompt once
    init = InitImage(...).encode(...)           # img2img's input preparer: the init image's posterior, once
                                                # (inpainting's: InpaintingInputs, optimizedSD/inpaint_inputs.py)
    for batch in plan_batches(...):             # per (iteration, prompt): the seeds
        latents = sample_batch(...)             #   noise, then the guided UNet under the sampler
        decode_and_write(...)                   #   one image at a time: decode, write, keep for the grid

Everything the user gave is checked before the (slow) model load. Images are decoded and written one at a
time, so images already written stay when a later one fails, and the VAE holds one image's activations.

Seeds: image ``k`` of a run (counting across the batch, the prompts and the iterations, in the order the
files are written) has seed ``seed + k``; its start noise is ``torch.randn((1, 4, H/8, W/8))`` from a CPU
generator seeded with that number (:class:`ldm.noise.SeededNoise`), so ``--seed seed+k --n_samples 1``
reproduces it alone. For img2img the same generator then draws the VAE posterior sample of the init image,
then the ancestral samplers' fresh noise. ``--fixed_code`` (as CompVis and the fork: one start code reused):
every batch uses the first batch's seeds, so image k of each batch has seed ``seed + k``.

Memory: which model sits on the device when is :class:`ldm.residency.Residency`'s business
(``--vram``/``--turbo``/``--vram_budget``); this loop only says which model it needs next. Out of memory:
:mod:`ldm.out_of_memory`'s ladders run a batch, or a decode, again lower.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm import samplers
from ldm.attention import attention_backend
from ldm.autoencoder import DiagonalGaussian
from ldm.checkpoint_file import CheckpointError
from ldm.config import ModelConfig, load_model_config
from ldm.diffusers_layout import is_diffusers_folder, weight_files
from ldm.guidance import GuidedDenoiser
from ldm.inpainting import INPAINTING_CONFIG, INPAINTING_IN_CHANNELS, blend_then, checkpoint_unet_in_channels
from ldm.lora import LoraFile, apply_loras, lora_hashes_text, text_encoder_lora_key
from ldm.model_loading import StableDiffusion, load_stable_diffusion, own_weights
from ldm.noise import SeededNoise
from ldm.out_of_memory import decode_with_retry, retry_lower
from ldm.quantize import quantize_unet
from ldm.residency import Residency, auto_budget_bytes, model_bytes, resolve_mode
from ldm.streaming import chunked_unet
from ldm.safety_checker import find_safety_checker_files
from ldm.schedule import DiffusionSchedule
from ldm.textual_inversion import EmbeddingLibrary
from ldm.token_merging import apply_token_merging
from ldm.vae_decoding import DEFAULT_TILE, decode_latents, should_tile
from optimizedSD import distributed
from optimizedSD.arguments import UsageError, resolve_config
from optimizedSD.batch_memory import PartQuery, grid_fits, grid_host_bytes, images_per_part
from ldm.messages import escaped
from optimizedSD.images import image_to_tensor, load_init_image, output_size
from optimizedSD.input_checks import (
    check_conditioning, check_finite, check_prompt_weights, check_text,
)
from optimizedSD.inpaint_inputs import InpaintingInputs
from optimizedSD.lora_tags import RunLora, collect_loras, metadata_prompt
from optimizedSD.outputs import SampleWriter, Watermarker, infotext, model_hash, prompt_folder_name, to_uint8
from optimizedSD.prompts import EmbeddingCache, PromptEncoder, checkpoint_fingerprint, distinct, parse_prompt, read_prompts_file
from optimizedSD.request import GenerationRequest
from optimizedSD.safety import RESIDENCY_NAME as SAFETY_CHECKER, SafetyStage
from optimizedSD.webui_syntax import parse_fragments, unsupported_features

log = logging.getLogger(__name__)

WEIGHTS_HELP = "see models/README.md for where to get Stable Diffusion v1 weights, or pass --ckpt"


@dataclass
class RunSummary:
    """What a run did (returned by :func:`generate`, printed by the scripts)."""

    written: list[Path] = field(default_factory=list)
    grid: Path | None = None
    images: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # checking the inputs, reading the checkpoint, building the models, pinning
    memory_mode: str = ""  # the mode the run started in (out of memory may step it down later)
    first_seed: int = 0
    peak_vram_bytes: int | None = None
    safety_mode: str | None = None  # --safety_checker_mode when the checker ran
    flagged: int = 0  # images the safety checker flagged
    ranks: int = 1  # torchrun processes that shared the run
    unfinished: dict[int, list[int]] = field(default_factory=dict)  # torchrun: rank -> units it did not finish

    def line(self) -> str:
        per_image = self.seconds / self.images if self.images else float("nan")
        rate = f"; {self.images / self.seconds:.2f} images/s over {self.ranks} ranks" if self.ranks > 1 and self.seconds else ""
        text = f"{self.images} images in {self.seconds:.1f} s ({per_image:.2f} s/image{rate})"
        if self.safety_mode is not None:
            text += f", {self.flagged} flagged by the safety checker" + (f" ({self.safety_mode})" if self.flagged else "")
        for rank, units in sorted(self.unfinished.items()):
            text += f", rank {rank} stopped with {len(units)} of its units not done"
        if self.written:
            folders = sorted({str(p.parent) for p in self.written})
            text += f", written to {folders[0]}" + (f" and {len(folders) - 1} more folders" if len(folders) > 1 else "")
        if self.grid is not None:
            text += f", grid {self.grid}"
        if self.peak_vram_bytes is not None:
            text += f", peak VRAM {self.peak_vram_bytes / 2**30:.2f} GiB"
        return text


# ---- 1. inputs, checked before the model load ----------------------------------------------------------------
@dataclass(frozen=True)
class RunInputs:
    """What the user gave, read and checked: prompts, init image, image size, output folder, model config."""

    prompts: list[str]
    init_image: Image.Image | None
    height: int
    width: int
    writer: SampleWriter
    config: ModelConfig
    inpainting: InpaintingInputs | None = None  # inpaint: the mask read and sized, and the init image's pixels
    loras: tuple[RunLora, ...] = ()  # --lora files, then the webui prompts' <lora:NAME:WEIGHT> tags


def check_inputs(request: GenerationRequest) -> RunInputs:
    """Read and check everything the user gave, so that mistakes surface before the (slow) model load."""
    prompts = read_prompts_file(request.from_file) if request.from_file else [check_text(request.prompt, "--prompt")]
    check_text(request.negative_prompt, "--negative_prompt")
    check_finite(request.scale, "--scale")
    prompts, loras = collect_loras(request, prompts)  # webui syntax: the prompts without their <lora:...> tags
    check_prompts(request, prompts)
    init_image = load_init_image(request.init_img) if request.img2img else None
    height, width = output_size(request, init_image)
    inpainting = None
    if request.inpaint:
        mask = request.mask
        inpainting = InpaintingInputs.prepare(init_image, mask.path, width, height, invert=mask.invert, blur=mask.blur,
                                              overlay=mask.overlay)
    writer = SampleWriter(request.outdir, request.image_format, Watermarker() if request.watermark else None)
    writer.prepare(".")
    for prompt in distinct(prompts) if not request.skip_save else ():  # every prompt's folder now, not after sampling
        writer.prepare(prompt_folder_name(prompt))
    if request.config is not None:
        load_model_config(request.config)  # a bad --config fails before the checkpoint is looked at
    if not request.ckpt.exists():
        raise UsageError(f"checkpoint not found: {request.ckpt}; {WEIGHTS_HELP}")
    if not request.ckpt.is_file() and not is_diffusers_folder(request.ckpt):
        raise UsageError(f"checkpoint is neither a file nor a diffusers model folder (with model_index.json): "
                         f"{request.ckpt}; {WEIGHTS_HELP}")
    if request.vae is not None and not request.vae.exists():
        raise UsageError(f"--vae not found: {request.vae}")
    for path, _ in request.loras:
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file")
    if request.safety_checker is not None:
        find_safety_checker_files(request.safety_checker)  # a wrong folder fails now, not after the model load
    config = load_model_config(model_config_path(request))
    if request.clip_skip > config.text.num_hidden_layers:
        raise UsageError(f"--clip_skip must be at most {config.text.num_hidden_layers} (the text encoder's layers), "
                         f"got {request.clip_skip}")
    if request.steps > config.schedule.timesteps:
        raise UsageError(f"--ddim_steps must be at most {config.schedule.timesteps}, got {request.steps}")
    return RunInputs(prompts, init_image, height, width, writer, config, inpainting, loras)


def model_config_path(request: GenerationRequest) -> Path:
    """``--config``, or without it the config the file's UNet needs: v1-inpainting-inference.yaml for 9 input
    channels, else v1-inference.yaml. txt2img and img2img refuse an inpainting file (its UNet needs a mask)."""
    try:  # a diffusers folder is not looked into here (its loader reads unet/config.json)
        channels = None if is_diffusers_folder(request.ckpt) else checkpoint_unet_in_channels(request.ckpt)
    except CheckpointError as error:
        raise UsageError(f"{error} ({WEIGHTS_HELP})") from None
    if channels == INPAINTING_IN_CHANNELS and not request.inpaint:
        raise UsageError(f"{request.ckpt} is an inpainting checkpoint (its UNet takes a mask and a masked image): "
                         "use optimizedSD/optimized_inpaint.py --init-img IMAGE --mask MASK")
    if request.config is not None:
        return request.config
    return INPAINTING_CONFIG if channels == INPAINTING_IN_CHANNELS else resolve_config(None)


def check_prompts(request: GenerationRequest, prompts: list[str]) -> None:
    """Prompts that cannot be encoded in the chosen syntax fail now, not after loading (fork: weights summing
    to zero; webui: a weight that is no number); webui features read as plain text are named once."""
    checker = PromptEncoder(syntax=request.prompt_syntax)
    unsupported: set[str] = set()
    for text in (*distinct(prompts), request.negative_prompt):
        checker.check(text)  # fork: weights summing to zero; webui: a weight that is no number
        if request.prompt_syntax == "fork":
            check_prompt_weights([weight for _, weight in parse_prompt(text).parts], text)
        else:
            check_prompt_weights([f.weight for f in parse_fragments(text) if not f.breaks_chunk], text)
            unsupported.update(unsupported_features(text))
    if unsupported:
        log.warning("not implemented, read as plain text: %s", ", ".join(sorted(unsupported)))
    if request.embeddings_dir_given and not request.embeddings_dir.is_dir():
        raise UsageError(f"--embeddings_dir {request.embeddings_dir}: no such folder")


# ---- 2. the model, once ----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """The loaded checkpoint (with its LoRAs merged), its memory mode and its noise schedule."""

    sd: StableDiffusion
    residency: Residency
    schedule: DiffusionSchedule
    loras: list[tuple[LoraFile, float]] = field(default_factory=list)
    safety: SafetyStage | None = None  # --safety_checker: one more model under the residency


def load_model(request: GenerationRequest, inputs: RunInputs) -> LoadedModel:
    """Load the checkpoint onto the CPU in the run's dtype and put it under a memory mode."""
    log.info("loading %s", request.ckpt)
    try:
        # --quantize reads the UNet's mapped weights straight into int8 (the load never holds it in float).
        sd = load_stable_diffusion(request.ckpt, inputs.config, dtype=request.dtype, use_ema=request.use_ema,
                                   vae=request.vae, copy_weights=not request.quantize)
    except CheckpointError as error:  # its message names the file
        raise UsageError(f"{error} ({WEIGHTS_HELP})") from None
    # On the host copy, before the memory mode moves anything.
    loras = apply_loras(sd, [(lora.path, lora.weight) for lora in inputs.loras])
    speed_up_unet(request, sd)
    own_weights(sd.unet, sd.vae, sd.text_encoder)  # no view into the file is left: see ldm.model_loading.owned_copy
    safety = None
    if request.safety_checker is not None:
        safety = SafetyStage.load(request.safety_checker, request.safety_checker_mode, request.dtype)
    residency = make_residency(request, sd, inputs.height, inputs.width, safety)
    return LoadedModel(sd, residency, sd.schedule, loras, safety)


def speed_up_unet(request: GenerationRequest, sd: StableDiffusion) -> None:
    """``--quantize`` (int8 weights, before the residency measures and moves them) and ``--tome`` (token merging)."""
    if request.quantize:
        quantize_unet(sd.unet, request.quantize)
    apply_token_merging(sd.unet, request.tome)


def resolve_attention(name: str, device: torch.device) -> str:
    """``--attention auto``: PyTorch's fused attention where it has memory-efficient kernels (CUDA, CPU);
    slices on MPS, whose fused attention builds the whole score matrix (diffusers and A1111 slice there too)."""
    if name != "auto":
        return name
    return "sliced" if device.type == "mps" else "sdpa"


def make_residency(request: GenerationRequest, sd: StableDiffusion, height: int, width: int,
                   safety: SafetyStage | None = None) -> Residency:
    """The memory mode (``--vram``, ``--turbo``, ``--vram_budget``); the safety checker as one more model."""
    device = request.device
    dtype = next(sd.unet.parameters()).dtype
    tiled = should_tile(height, width, request.vae_tiling)
    extra = {SAFETY_CHECKER: safety.checker} if safety is not None else {}
    mode = resolve_mode(request.vram, device, height, width, request.n_samples, sd=sd, dtype=dtype, tiled=tiled,
                        extra_bytes=safety.weight_bytes if safety is not None else 0)
    budget = request.vram_budget_bytes
    if budget is None and request.vram == "auto" and mode == "low":
        budget = auto_budget_bytes(device, height, width, request.n_samples, sd=sd, dtype=dtype)
    try:
        residency = Residency(sd, device, mode=mode, budget_bytes=budget, extra_models=extra)
    except ValueError as error:  # e.g. a --vram_budget too small for the largest block
        raise UsageError(str(error)) from None
    log.info("memory mode %s on %s", mode, device)
    return residency


# ---- 3. prompts ----------------------------------------------------------------------------------------------
def load_embeddings(request: GenerationRequest, sd: StableDiffusion) -> EmbeddingLibrary | None:
    """The textual-inversion embeddings of ``--embeddings_dir`` (none when the default folder is absent)."""
    if not request.embeddings_dir.is_dir():
        return None
    text_encoder = sd.text_encoder
    library = EmbeddingLibrary.from_directory(request.embeddings_dir, text_encoder.tokenize_fragment,
                                              text_encoder.config.hidden_size)
    log.info("%d textual-inversion embeddings from %s", len(library), request.embeddings_dir)
    return library


def encode_prompts(request: GenerationRequest, prompts: list[str], model: LoadedModel) -> PromptEncoder:
    """Every distinct (sub-)prompt through the text encoder once; from ``--embedding_cache`` when there.

    The cache key names the LoRAs merged into the text encoder (:func:`ldm.lora.text_encoder_lora_key`), so
    encodings cached without them (or with others) are not reused."""
    residency = model.residency
    lora_key = text_encoder_lora_key(model.loras)
    cache = None
    if request.embedding_cache is not None:
        try:
            key = " ".join(filter(None, (text_encoder_fingerprint(request.ckpt), lora_key)))
            cache = EmbeddingCache(request.embedding_cache, key, request.dtype)
        except OSError as error:  # the cache only saves time: never fail a run over it
            log.warning("not using --embedding_cache %s: %s", escaped(request.embedding_cache),
                        escaped(error.strerror or error))
    encoder = PromptEncoder(cache, syntax=request.prompt_syntax, clip_skip=request.clip_skip,
                            embeddings=load_embeddings(request, model.sd))
    needed = distinct(prompts) + ([request.negative_prompt] if request.guided else [])
    if encoder.missing(needed):
        with residency.use("text_encoder") as text_encoder:
            encoder.encode_missing(needed, text_encoder)
    return encoder


def text_encoder_fingerprint(ckpt: Path) -> str:
    """What keys cached encodings: the checkpoint file, or a diffusers folder's text-encoder weight files."""
    if not ckpt.is_dir():
        return checkpoint_fingerprint(ckpt)
    return hashlib.sha256("".join(checkpoint_fingerprint(f) for f in weight_files(ckpt / "text_encoder")).encode()).hexdigest()


def weights_hash(path: Path | None) -> str | None:
    """A1111's shorthash (sha256 of the whole file, 10 digits); a diffusers folder has none."""
    return model_hash(path) if path is not None and path.is_file() else None


# ---- 4. img2img's input preparer -------------------------------------------------------------------------------
@dataclass
class InitImage:
    """img2img's start: the init image's VAE posterior (encoded once), sampled per image with its seed."""

    posterior: DiagonalGaussian
    scale_factor: float

    @classmethod
    def encode(cls, image: Image.Image, width: int, height: int, model: LoadedModel, dtype: torch.dtype) -> InitImage:
        pixels = image_to_tensor(image, width, height)
        with model.residency.use("vae.encoder") as vae, torch.no_grad():
            posterior = vae.encode(pixels.to(device=model.residency.device, dtype=dtype))
        return cls(posterior, model.sd.scale_factor)

    def latent(self, noise: SeededNoise, x_T: torch.Tensor) -> torch.Tensor:
        """The images' init latents; each image's generator draws its posterior sample right after its x_T."""
        return self.scale_factor * self.posterior.sample(noise(x_T)).float()

    def start(self, noise: SeededNoise, x_T: torch.Tensor, scale_factor: float, **walk) -> BatchStart:
        return BatchStart(self.latent(noise, x_T))


@dataclass(frozen=True)
class BatchStart:
    """What an input preparer (``InitImage``, ``InpaintingInputs``) gives one batch: the init latent, a wrapper
    around the (chunked) UNet (the inpainting UNet's extra channels) and a per-step hook on the latent,
    ``after_step(step, total, x) -> x`` (the known region's blend)."""

    init_latent: torch.Tensor | None = None
    wrap_unet: Callable = lambda unet: unet
    after_step: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None


def prepare_init(request: GenerationRequest, inputs: RunInputs, model: LoadedModel) -> InitImage | InpaintingInputs | None:
    """The run's input preparer, its images encoded once: img2img's ``InitImage``, inpainting's ``InpaintingInputs``
    (the init image where it is used, the masked image for a 9-channel UNet), or None (txt2img)."""
    if inputs.inpainting is not None:
        nine = inputs.config.unet.in_channels == INPAINTING_IN_CHANNELS
        inputs.inpainting.encode(model.residency, request.device, request.dtype, nine_channel=nine,
                                 needs_init=not nine or request.strength < 1)
        return inputs.inpainting
    if request.img2img:
        return InitImage.encode(inputs.init_image, inputs.width, inputs.height, model, request.dtype)
    return None


# ---- 5. batches: sample, decode, write ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One UNet batch: ``iteration`` and ``prompt_index`` place it in the run; ``seeds`` name its images
    and seed their noise (with ``--fixed_code``, the first batch's seeds again)."""

    iteration: int
    prompt_index: int
    prompt: str
    seeds: tuple[int, ...]
    first_image: int = 0  # the run-wide index of the batch's first image (the order files are written in)


def plan_batches(request: GenerationRequest, prompts: list[str]) -> Iterator[Batch]:
    """The run's batches in the order their files are written: iterations, then prompts. (A batch larger than
    the memory holds samples in parts: :func:`batch_parts`.)"""
    size = request.n_samples
    first_image = 0
    for iteration in range(request.n_iter):
        for index, prompt in enumerate(prompts):
            start = request.seed + (0 if request.fixed_code else first_image)
            yield Batch(iteration, index, prompt, tuple(start + k for k in range(size)), first_image)
            first_image += size


def batch_parts(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` as consecutive parts of at most ``size`` images, each with its own seeds and place in the run
    (the same images as the whole batch: each image's noise, conditioning and sampling are its own)."""
    for start in range(0, len(batch.seeds), size):
        yield Batch(batch.iteration, batch.prompt_index, batch.prompt, batch.seeds[start : start + size],
                    batch.first_image + start)


def part_size(request: GenerationRequest, inputs: RunInputs, model: LoadedModel, outputs: RunOutputs, tiled: bool) -> int:
    """How many of a batch's images sample together (:mod:`optimizedSD.batch_memory`): all unless the memory
    available to the run (host memory on a CPU) holds fewer; not even one is a one-line error before sampling."""
    weights = sum(model_bytes(model.sd).values())
    query = PartQuery(inputs.config, model.residency.mode, inputs.height, inputs.width, request.dtype, request.sampler,
                      "sliced" if request.attention == "sliced" else "sdpa", request.unet_bs, request.device, tiled,
                      request.quantize, request.tome, weights)
    grid = grid_host_bytes(outputs.images, inputs.height, inputs.width) if outputs.keep_grid else 0
    return images_per_part(query, request.n_samples, extra_host_bytes=grid)


def sample_batch(request: GenerationRequest, model: LoadedModel, encoder: PromptEncoder,
                 init: InitImage | InpaintingInputs | None, batch: Batch, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """One batch's latents, run again one memory mode lower after out of memory (with the same noise)."""
    device, dtype, size = request.device, request.dtype, len(batch.seeds)
    negative = request.negative_prompt if request.guided else None
    length = encoder.context_length(batch.prompt, *([negative] if negative is not None else []))
    cond = encoder.batch(batch.prompt, size, device, dtype, length)  # long prompts: 77 tokens a chunk
    uncond = encoder.batch(negative, size, device, dtype, length) if negative is not None else None
    check_conditioning(cond, "prompt")  # NaN here (fp16 overflow, a bad cache entry) is a black image
    if uncond is not None:
        check_conditioning(uncond, "negative prompt")

    def attempt() -> torch.Tensor:
        noise = SeededNoise(batch.seeds)  # fresh generators on every try: a retry draws the same noise
        x_T = noise.initial(latent_shape, device=device)
        start = BatchStart()
        if init is not None:  # each image's generator draws its posterior samples right after its x_T
            start = init.start(noise, x_T, model.sd.scale_factor, sampler=request.sampler, schedule=model.schedule,
                               steps=request.steps, strength=request.strength)
        return run_sampler(request, model.residency, model.schedule, GuidedInputs(cond, uncond), x_T, start, noise)

    return retry_lower(model.residency, attempt)


@dataclass(frozen=True)
class GuidedInputs:
    """The conditioning of a batch: prompt and (when guided) negative prompt, ``[B, 77 * chunks, D]`` each."""

    cond: torch.Tensor
    uncond: torch.Tensor | None


def run_sampler(request: GenerationRequest, residency: Residency, schedule: DiffusionSchedule, guided: GuidedInputs,
                x_T: torch.Tensor, start: BatchStart, noise: SeededNoise) -> torch.Tensor:
    """The guided UNet under the chosen sampler, with a tqdm bar over the steps."""
    bar = None

    def progress(step: int, total: int, x: torch.Tensor) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc=f"Sampling ({request.sampler})", leave=False, unit="step",
                          disable=not distributed.is_main_process())
        bar.update(1)

    try:
        with residency.use("unet") as unet, torch.no_grad():
            unet = start.wrap_unet(chunked_unet(unet, request.unet_bs))
            eps_model = GuidedDenoiser(unet, guided.cond, guided.uncond, request.scale)
            callback = progress if start.after_step is None else blend_then(start.after_step, progress)
            return samplers.sample(
                request.sampler, eps_model, schedule, x_T, request.steps, eta=request.eta, init_latent=start.init_latent,
                strength=request.strength if request.img2img else 1.0, noise_sampler=noise, callback=callback,
            )
    finally:
        if bar is not None:
            bar.close()


def decode_image(residency: Residency, latent: torch.Tensor, scale_factor: float, tiled: bool, tile: int | None) -> torch.Tensor:
    """One image's latent -> pixels in [-1, 1]; in overlapping tiles with ``--vae_tiling`` or for large images,
    and again in fp32 if the fp16 VAE overflows."""
    with residency.use("vae.decoder") as vae, torch.no_grad():
        return decode_latents(vae, latent / scale_factor, tiled, tile or DEFAULT_TILE)


class RunOutputs:
    """Where finished images go: each written at once with its metadata, and kept for the grid."""

    def __init__(self, request: GenerationRequest, inputs: RunInputs, summary: RunSummary, lora_hashes: str | None = None) -> None:
        self.request, self.writer, self.summary = request, inputs.writer, summary
        self.lora_hashes, self.loras = lora_hashes, inputs.loras
        self.size = (inputs.width, inputs.height)
        self.model_hash = None if request.skip_save and request.skip_grid else weights_hash(request.ckpt)
        self.vae_hash = None if request.skip_save and request.skip_grid else weights_hash(request.vae)
        self.grid_images: list[tuple[int, np.ndarray]] = []  # (image index, pixels)
        self.grid_text: str | None = None  # the grid carries its first image's parameters
        self.encoder: PromptEncoder | None = None  # set once the prompts are encoded (their metadata fields)
        self.file_numbers: list[int] | None = None  # torchrun: each image's number in a single process's naming
        self.inpainting = inputs.inpainting
        self.images = request.n_iter * len(inputs.prompts) * request.n_samples
        # A grid over the cap is not made (one warning line): its images would all stay in host memory.
        self.keep_grid = not request.skip_grid and grid_fits(self.images, inputs.height, inputs.width)

    def infotext_fields(self, prompt: str, negative: str) -> dict[str, str]:
        """The prompts' own metadata fields (webui syntax), then inpainting's (``Mask blur``)."""
        fields = dict(self.encoder.infotext_fields(prompt, negative)) if self.encoder is not None else {}
        if self.inpainting is not None:
            fields.update(self.inpainting.metadata())
        return fields

    def pixels(self, decoded: torch.Tensor) -> np.ndarray:
        """A decoded image (``[1, 3, H, W]`` in [-1, 1] on the device) in 8 bits, with inpainting's kept pixels
        laid back (unless ``--no_overlay``)."""
        image = to_uint8(decoded)[0]
        return self.inpainting.finish(image) if self.inpainting is not None else image

    def add(self, batch: Batch, k: int, decoded: torch.Tensor, safety: str | None = None) -> None:
        """Image ``k`` of ``batch`` as decoded: to 8 bits (:meth:`pixels`), written, kept for the grid."""
        self.add_pixels(batch, k, self.pixels(decoded), safety)

    def add_pixels(self, batch: Batch, k: int, image: np.ndarray, safety: str | None = None) -> None:
        """Image ``k`` of ``batch`` in 8 bits; ``safety``: the safety checker's mark for its metadata."""
        request, seed, index = self.request, batch.seeds[k], batch.first_image + k
        text = self._infotext(batch.prompt, seed, safety)
        if not request.skip_save:
            number = None if self.file_numbers is None else self.file_numbers[index]
            self.summary.written.append(self.writer.write_sample(prompt_folder_name(batch.prompt), seed, image, text, number))
        self.summary.images += 1  # after the write: a rank stopped while writing counts only what is on disk
        self.summary.flagged += safety is not None
        if self.keep_grid:
            self.grid_images.append((index, image))
            self.grid_text = self.grid_text or text

    def _infotext(self, prompt: str, seed: int, safety: str | None) -> str:
        request = self.request
        negative = request.negative_prompt if request.guided else ""
        return infotext(
            metadata_prompt(prompt, self.loras), negative, steps=request.steps, sampler=request.sampler,
            scale=request.scale, seed=seed, width=self.size[0], height=self.size[1], model_hash=self.model_hash,
            model_name=request.ckpt.stem, vae_hash=self.vae_hash, vae_name=request.vae.name if request.vae else None,
            strength=request.strength, eta=request.eta, lora_hashes=self.lora_hashes, token_merging_ratio=request.tome,
            extra=self.infotext_fields(prompt, negative),
            safety_checker=safety,
        )

    def finish(self, images: list[np.ndarray] | None = None) -> None:
        """The grid of the run's images, in their order (torchrun: rank 0 passes every rank's)."""
        images = [image for _, image in self.grid_images] if images is None else images
        if images:
            self.summary.grid = self.writer.write_grid(images, self.request.n_rows, self.grid_text)


def decode_and_write(model: LoadedModel, batch: Batch, latents: torch.Tensor, tiled: bool, outputs: RunOutputs) -> None:
    """Decode the batch one image at a time (each with its own out-of-memory ladder) and hand it on; with the
    safety checker, the batch's images go through it together (it comes onto the device once per batch)."""
    decoded_images = []
    for k in range(len(batch.seeds)):
        latent = latents[k : k + 1]
        decoded = decode_with_retry(
            model.residency, lambda tiled, tile: decode_image(model.residency, latent, model.sd.scale_factor, tiled, tile), tiled
        )
        if model.safety is None:
            outputs.add(batch, k, decoded)
        else:
            decoded_images.append(outputs.pixels(decoded))  # overlay first: a flagged image is black all over
    if model.safety is not None:
        checked = retry_lower(model.residency, lambda: model.safety.check(model.residency, decoded_images))
        for k, (image, verdict) in enumerate(checked):
            outputs.add_pixels(batch, k, image, model.safety.metadata(verdict))


def decode_in_tiles(request: GenerationRequest, inputs: RunInputs, mode: str) -> bool:
    """Tile the decode with ``--vae_tiling``, above 1024 px, and in low mode where the VRAM ledger says a
    whole-image decode would set the run's peak above the UNet's (768 px and up for SD v1 in fp16; tiles
    change the picture slightly, so only where the memory needs them)."""
    if should_tile(inputs.height, inputs.width, request.vae_tiling):
        return True
    if mode != "low" or request.device.type != "cuda":
        return False
    from ldm.ledger import RunShape
    from ldm.ledger.plan import low_mode_tiles

    attention = "sliced" if request.attention == "sliced" else "sdpa"
    shape = RunShape(inputs.height, inputs.width, request.n_samples, request.sampler, request.steps, request.scale,
                     attention, False, request.unet_bs, request.img2img)
    return low_mode_tiles(str(request.config or resolve_config(None)), shape, request.dtype, request.quantize,
                          request.tome)


# ---- the run ---------------------------------------------------------------------------------------------------
def generate(request: GenerationRequest) -> RunSummary:
    """Run the scripts' job for a parsed and checked request (see :func:`optimizedSD.arguments.parse_args`)."""
    started = time.perf_counter()
    job, request = distributed.join(request)  # torchrun: this rank's device and rank 0's seed; else (None, request)
    inputs = check_inputs(request)
    if job is None or job.is_main:
        print(f"Seed: {request.seed}" + (" (fixed code: every batch starts from the first batch's noise)" if request.fixed_code else ""))
    model = load_model(request, inputs)
    summary = RunSummary(first_seed=request.seed, load_seconds=time.perf_counter() - started,
                         memory_mode=model.residency.mode, ranks=job.world_size if job else 1,
                         safety_mode=request.safety_checker_mode if model.safety is not None else None)
    device = request.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The backend for this run only (the out-of-memory ladders may switch to slices inside it).
    with attention_backend(resolve_attention(request.attention, device)):
        try:
            run_batches(request, inputs, model, summary, job)
        finally:
            model.residency.release()
            if job is not None:
                job.stop()
    summary.seconds = time.perf_counter() - started
    if device.type == "cuda":
        summary.peak_vram_bytes = torch.cuda.max_memory_allocated(device)
    return summary


def run_batches(request: GenerationRequest, inputs: RunInputs, model: LoadedModel, summary: RunSummary,
                job: distributed.Distributed | None) -> None:
    """Prompts, the input preparer, then every batch (under torchrun, this rank's share) and the grid."""
    outputs = RunOutputs(request, inputs, summary, lora_hashes_text(model.loras, [lora.name for lora in inputs.loras]))
    encoder = outputs.encoder = encode_prompts(request, inputs.prompts, model)
    init = prepare_init(request, inputs, model)
    cfg = inputs.config
    latent_shape = (cfg.latent_channels, inputs.height // cfg.downsampling_factor, inputs.width // cfg.downsampling_factor)
    tiled = decode_in_tiles(request, inputs, model.residency.mode)
    batches = list(plan_batches(request, inputs.prompts))
    size = part_size(request, inputs, model, outputs, tiled)

    def run_batch(batch: Batch) -> None:
        for part in batch_parts(batch, size):  # one part unless the batch is larger than the memory holds
            decode_and_write(model, part, sample_batch(request, model, encoder, init, part, latent_shape), tiled, outputs)

    if job is not None:
        run_rank_share(job, request, inputs, batches, run_batch, outputs)
        return
    for batch in tqdm(batches, desc="Batches", disable=len(batches) == 1):
        run_batch(batch)
    outputs.finish()


def run_rank_share(job: distributed.Distributed, request: GenerationRequest, inputs: RunInputs, batches: list[Batch],
                   run_batch: Callable[[Batch], None], outputs: RunOutputs) -> None:
    """torchrun: this rank's batches (see :mod:`optimizedSD.distributed`), then rank 0 gathers every rank's
    results for the grid and the summary. A rank that stops early prints its one error line, still joins the
    gather (so the others finish), then raises :class:`~optimizedSD.distributed.RankStopped`."""
    folders = [prompt_folder_name(prompt) for prompt in inputs.prompts]
    # Rank 0 reads the folders' next free numbers before anyone writes; every rank names its files from them.
    starts = job.broadcast({f: inputs.writer.next_number(f) for f in set(folders)} if job.is_main else None)
    outputs.file_numbers = distributed.planned_file_numbers(folders, request.n_iter, request.n_samples, starts)
    units = distributed.work_units(len(inputs.prompts), request.n_iter, request.n_samples)
    mine = distributed.units_for_rank(units, job.rank, job.world_size)
    bar = tqdm(total=len(mine), desc=f"Batches (rank 0 of {job.world_size})", disable=not job.is_main)
    unfinished, error = distributed.run_share(mine, lambda unit: (run_batch(batches[unit.index]), bar.update(1)))
    bar.close()
    line = None
    if error is not None:
        line = distributed.report_stop(f"optimized_{request.mode}.py", job, error, unfinished, request.seed, request.fixed_code)
    summary = outputs.summary
    results = job.gather(distributed.RankResult(
        job.rank, images=summary.images, flagged=summary.flagged, written=[str(p) for p in summary.written],
        grid_images=outputs.grid_images, unfinished=[unit.index for unit in unfinished],
    ))
    if job.is_main:
        merged = distributed.merge_results(results)
        summary.images, summary.flagged, summary.unfinished = merged.images, merged.flagged, merged.unfinished
        summary.written = [Path(p) for p in merged.written]
        outputs.finish(merged.grid_images)
    if line is not None:
        raise distributed.RankStopped(line)
