"""The model stage: the checkpoint loaded once in the run's dtype, its LoRAs merged, the UNet sped up as asked,
and the memory mode that says which model sits on the device when (:class:`~ldm.memory.residency.Residency`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ldm.backends.ir_cache import IRCache
from ldm.backends.openvino_runtime import openvino_version
from ldm.backends.openvino_unet import OpenVinoUNet
from ldm.backends.shape_compiler import Shapes
from ldm.backends.unet_engine import cached_unet, openvino_unet, unet_key
from ldm.backends.vae_engine import DECODER, ENCODER, OpenVinoVAEHalf, VAEHalf, half_key, openvino_half
from ldm.checkpoints.errors import CheckpointError
from ldm.conditioning.prompts import PromptEncoder
from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.config import ModelConfig
from ldm.control.units import ControlUnit, place_units, read_nets
from ldm.errors import UsageError
from ldm.loading.lora import LoraFile, apply_loras
from ldm.loading.fingerprints import part_fingerprints
from ldm.loading.stable_diffusion import StableDiffusion, load_stable_diffusion, own_weights
from ldm.memory.mode_choice import auto_budget_bytes, resolve_mode
from ldm.memory.residency import Residency
from ldm.memory.vae_decoding import should_tile
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.quantize import quantize_unet
from ldm.models.token_merging import apply_token_merging
from ldm.passes.upscalers import find_upscaler
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.safety import RESIDENCY_NAME as SAFETY_CHECKER, SafetyStage
from ldm.samplers.schedule import DiffusionSchedule

log = logging.getLogger(__name__)

WEIGHTS_HELP = "see models/README.md for where to get Stable Diffusion v1 weights, or pass --ckpt"


@dataclass
class LoadedModel:
    """The loaded checkpoint (with its LoRAs merged), its memory mode and its noise schedule."""

    sd: StableDiffusion
    residency: Residency
    schedule: DiffusionSchedule
    loras: list[tuple[LoraFile, float]] = field(default_factory=list)
    safety: SafetyStage | None = None  # --safety_checker: one more model under the residency
    control: tuple[ControlUnit, ...] = ()  # --control_model: ControlNets under the same residency (ldm/control)
    unet_engine: OpenVinoUNet | None = None  # --backend openvino: runs the UNet instead of sd.unet
    vae_decoder_engine: OpenVinoVAEHalf | None = None  # --backend openvino: the whole-image decodes instead of sd.vae
    vae_encoder_engine: OpenVinoVAEHalf | None = None  # --backend openvino: the whole-image encodes instead of sd.vae


def load_model(request: GenerationRequest, config: ModelConfig, loras: Sequence[tuple[Path, float]],
               height: int, width: int, control_images: Sequence[Image.Image] = (),
               progress: Callable[[str], object] | None = None, first: FirstCall | None = None) -> LoadedModel:
    """Load the checkpoint onto the CPU in the run's dtype, merge ``loras`` ((file, weight) in order) and put
    it under a memory mode for images of ``height`` x ``width``; the ControlNets of ``request.control`` with
    their ``control_images`` (opened and checked, in the same order) under the same memory mode; ``progress``
    gets the lines of a slow step (an OpenVINO conversion); ``first``, the run's first UNet call, lets
    ``--backend openvino`` compile it while the checkpoint loads."""
    if len(control_images) != len(request.control):
        raise UsageError(f"{len(request.control)} ControlNet(s) but {len(control_images)} control image(s) given to this run")
    nets = read_nets(request.control, config, request.dtype)  # a file that is no ControlNet fails before the load
    early = early_unet_engine(request, config, loras, first) if first is not None else None
    log.info("loading %s", request.ckpt)
    try:
        # --quantize reads the UNet's mapped weights straight into int8 (the load never holds it in float).
        sd = load_stable_diffusion(request.ckpt, config, dtype=request.dtype, use_ema=request.use_ema,
                                   vae=request.vae, copy_weights=not request.quantize, unet_weights=early is None)
    except CheckpointError as error:  # its message names the file
        raise UsageError(f"{error} ({WEIGHTS_HELP})") from None
    merged = apply_loras(sd, list(loras))  # on the host copy, before the memory mode moves anything
    speed_up_unet(request, sd)
    own_weights(sd.unet, sd.vae, sd.text_encoder)  # no view into the file is left: see ldm.loading.stable_diffusion
    safety = None
    if request.safety_checker is not None:
        safety = SafetyStage.load(request.safety_checker, request.safety_checker_mode, request.dtype)
    control_bytes = sum(p.numel() * p.element_size() for net in nets for p in net.parameters())
    engine = early or unet_engine(request, sd, loras, progress)  # before the residency: it may give the weights back
    decoder, encoder = vae_engines(request, sd, height, width, first)
    residency = make_residency(request, sd, height, width, safety, control_bytes)
    control = place_units(nets, request.control, control_images, residency, width, height)
    return LoadedModel(sd, residency, sd.schedule, merged, safety, control, engine, decoder, encoder)


def unet_engine(request: GenerationRequest, sd: StableDiffusion, loras: Sequence[tuple[Path, float]],
                progress: Callable[[str], object] | None = None) -> OpenVinoUNet | None:
    """``--backend openvino``: the UNet converted (or read from ``--backend_cache``) and compiled for the CPU;
    None for the PyTorch backend."""
    if request.backend != "openvino":
        return None
    version = openvino_version()
    key = unet_key(part_fingerprints(request.ckpt).unet, sd.config.unet, use_ema=request.use_ema, loras=loras,
                   quantize=request.quantize, dtype=request.dtype, openvino_version=version)
    return openvino_unet(sd.unet, sd.config.unet, key, IRCache(request.backend_cache, version), progress)


def vae_engines(request: GenerationRequest, sd: StableDiffusion, height: int, width: int,
                first: FirstCall | None) -> tuple[OpenVinoVAEHalf | None, OpenVinoVAEHalf | None]:
    """``--backend openvino`` with a cache: the KL VAE's decoder and, for a run that encodes images (img2img,
    inpainting, a hires fix with a pixel upscaler), its encoder, each converted (once, into the cache); the
    decoder's first image's shape (a pixel upscaler's: the first pass's size) compiling in the background. None
    for each otherwise (TAESD, no cache, images that will all be tiled: :mod:`ldm.backends.vae_engine`), and None
    with a warning when OpenVINO cannot convert one (PyTorch runs it)."""
    if (request.backend != "openvino" or request.backend_cache is None or not isinstance(sd.vae, AutoencoderKL)
            or should_tile(height, width, request.vae_tiling)):
        return None, None
    upscaler = find_upscaler(request.hires.upscaler) if request.hires is not None else None
    pixel_hires = upscaler is not None and not upscaler.latent
    decoder = vae_half_engine(request, sd, DECODER)
    if decoder is not None:
        first_height, first_width = (first.height, first.width) if pixel_hires and first is not None else (height, width)
        factor = sd.config.downsampling_factor
        decoder.compile_ahead(((1, sd.config.vae.embed_dim, first_height // factor, first_width // factor),))
    return decoder, vae_half_engine(request, sd, ENCODER) if request.img2img or pixel_hires else None


def vae_half_engine(request: GenerationRequest, sd: StableDiffusion, half: VAEHalf) -> OpenVinoVAEHalf | None:
    version = openvino_version()
    try:
        return openvino_half(sd.vae, half, half_key(sd.vae, half, sd.config.vae, version),
                             IRCache(request.backend_cache, version))
    except RuntimeError as error:  # OpenVINO's conversion: the half stays in PyTorch, as without the backend
        log.warning("the %s stays in PyTorch: OpenVINO could not convert it (%s)", half.name, error)
        return None


@dataclass(frozen=True)
class FirstCall:
    """What the run's first UNet call is made of: the first batch's prompt, and the first pass's size (the hires
    fix's first pass, not its final size)."""

    prompt: str
    height: int
    width: int


def early_unet_engine(request: GenerationRequest, config: ModelConfig, loras: Sequence[tuple[Path, float]],
                      first: FirstCall) -> OpenVinoUNet | None:
    """``--backend openvino`` whose converted UNet the cache holds: the engine before the checkpoint is read, the
    run's first call compiling in the background meanwhile (:func:`first_unet_shapes`), and the load then skips
    the UNet's weights (3.2 GiB for SD v1 in fp32: not copied, nor scanned in a checkpoint file). Not with LoRAs or
    ``--quantize``, which change the UNet the load builds; not when the checkpoint cannot be read (the load then
    says why)."""
    if request.backend != "openvino" or loras or request.quantize:
        return None
    version = openvino_version()
    try:
        key = unet_key(part_fingerprints(request.ckpt).unet, config.unet, use_ema=request.use_ema, loras=(),
                       quantize=None, dtype=request.dtype, openvino_version=version)
    except (OSError, CheckpointError):
        return None
    engine = cached_unet(config.unet, key, IRCache(request.backend_cache, version))
    if engine is not None:
        engine.compile_ahead(lambda: first_unet_shapes(request, config, first))
    return engine


def first_unet_shapes(request: GenerationRequest, config: ModelConfig, first: FirstCall) -> Shapes:
    """The input shapes of the run's first UNet call as :class:`~ldm.samplers.guidance.GuidedDenoiser` makes it:
    the batch's conditional and unconditional rows together (at most ``--unet_bs``), the prompt and the negative
    prompt padded to the longer one's 77-token chunks. Textual-inversion embeddings are not known before the load:
    a prompt that uses one may take another chunk than counted here (the run then compiles its own shape)."""
    rows = request.n_samples * (2 if request.guided else 1)
    rows = min(rows, request.unet_bs) if request.unet_bs else rows
    with torch.device("meta"):
        chunker = CLIPTextEncoder(config.text)  # its tokenizer; the weights are not needed to count tokens
    prompts = [first.prompt, *([request.negative_prompt] if request.guided else [])]
    chunks = PromptEncoder(syntax=request.prompt_syntax, chunker=chunker).chunk_count(*prompts)
    factor = config.downsampling_factor
    return ((rows, config.unet.in_channels, first.height // factor, first.width // factor), (rows,),
            (rows, config.text.max_position_embeddings * chunks, config.unet.context_dim))


def speed_up_unet(request: GenerationRequest, sd: StableDiffusion) -> None:
    """``--quantize`` (int8 weights, before the residency measures and moves them) and ``--tome`` (token merging)."""
    if request.quantize:
        quantize_unet(sd.unet, request.quantize)
    apply_token_merging(sd.unet, request.tome)


def attention_name(name: str, device: torch.device) -> str:
    """The attention backend ``--attention`` means on ``device``: ``auto`` is PyTorch's fused attention where it
    has memory-efficient kernels (CUDA, CPU, and the ``meta`` device that stands for CUDA in the VRAM ledger);
    slices on MPS, whose fused attention builds the whole score matrix (diffusers and A1111 slice there too)."""
    if name != "auto":
        return name
    return "sliced" if device.type == "mps" else "sdpa"


def make_residency(request: GenerationRequest, sd: StableDiffusion, height: int, width: int,
                   safety: SafetyStage | None = None, control_bytes: int = 0) -> Residency:
    """The memory mode (``--vram``, ``--turbo``, ``--vram_budget``); the safety checker as one more model, and
    ``control_bytes`` of ControlNets, in what ``--vram auto`` must fit."""
    device = request.device
    dtype = next(sd.unet.parameters()).dtype
    tiled = should_tile(height, width, request.vae_tiling)
    extra = {SAFETY_CHECKER: safety.checker} if safety is not None else {}
    mode = resolve_mode(request.vram, device, height, width, request.n_samples, sd=sd, dtype=dtype, tiled=tiled,
                        extra_bytes=(safety.weight_bytes if safety is not None else 0) + control_bytes)
    budget = request.vram_budget_bytes
    if budget is None and request.vram == "auto" and mode == "low":
        budget = auto_budget_bytes(device, height, width, request.n_samples, sd=sd, dtype=dtype)
    try:
        residency = Residency(sd, device, mode=mode, budget_bytes=budget, extra_models=extra)
    except ValueError as error:  # e.g. a --vram_budget too small for the largest block
        raise UsageError(str(error)) from None
    log.info("memory mode %s on %s", mode, device)
    return residency
