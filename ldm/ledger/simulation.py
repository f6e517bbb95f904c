"""The VRAM ledger: the peak device memory of a run, known before the run, from the config alone.

:func:`simulate` builds the three models on PyTorch's ``meta`` device (shapes, no weights, no memory) and
runs the generator's own code on ``meta`` as the compute device: :class:`~ldm.residency.Residency` in the
chosen memory mode, the text encoder, the guided sampler for every step, the VAE decode of each image. A
:class:`~ldm.ledger.counting.DeviceBytes` mode counts the live device bytes of every op (the simulation's
``torch.cuda.max_memory_allocated``) and :class:`~ldm.ledger.attention_replay.CudaAttentionChoice`
replays CUDA's attention kernels, so the figure is the one a CUDA GPU would report for the same run,
less the CUDA context and cuBLAS/cuDNN workspaces (which ``max_memory_allocated`` does not count either).

The result is split by phase (text encoder, UNet, VAE) and into weights and activations at each peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from ldm.ledger.attention_replay import CudaAttentionChoice
from ldm.ledger.counting import DeviceBytes, Peak

log = logging.getLogger(__name__)

PHASES = ("text_encoder", "unet", "vae")
DEVICE = torch.device("meta")


@dataclass(frozen=True)
class LedgerRun:
    """What one simulated run needs from the GPU: its peak, the peak of each phase, the kernels chosen, and
    the bytes copied host -> device in each phase (low mode's streaming: every UNet weight at every step)."""

    mode: str
    peak: Peak
    phase_peaks: dict[str, Peak]
    attention_kernels: dict[str, int] = field(default_factory=dict)
    onload_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=lambda name: self.phase_peaks[name].total)

    def as_json(self) -> dict:
        return {
            "peak_bytes": self.peak.total,
            "phase_peaks": {name: self.phase_peaks[name].total for name in PHASES if name in self.phase_peaks},
            "weight_bytes": self.peak.weights,
        }


def meta_stable_diffusion(config, dtype: torch.dtype = torch.float16, quantize: str | None = None,
                          tome: float | None = None):
    """SD v1 (or any config's) three models on ``meta`` in ``dtype``, as :func:`load_stable_diffusion`
    would return them from a checkpoint: the same modules, the same parameter dtypes, no data. With
    ``quantize`` ("int8") and ``tome`` (a ratio) the UNet is changed as the generation loop changes it
    (``optimizedSD.generation.speed_up_unet``): int8 weights (and their per-call dequantized copies) and
    merged tokens are what the ledger then counts."""
    from ldm.quantize import quantize_unet
    from ldm.token_merging import apply_token_merging
    from ldm.autoencoder import AutoencoderKL
    from ldm.config import load_model_config
    from ldm.model_loading import StableDiffusion
    from ldm.schedule import DiffusionSchedule
    from ldm.text_encoder import CLIPTextEncoder
    from ldm.unet import UNetModel

    cfg = load_model_config(config) if not hasattr(config, "unet") else config
    with torch.device("meta"):
        unet, vae, text_encoder = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextEncoder(cfg.text)
    for module in (unet, vae, text_encoder):
        module.to(dtype).eval().requires_grad_(False)
    if quantize:
        quantize_unet(unet, quantize)
    apply_token_merging(unet, tome)
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text_encoder,
        schedule=DiffusionSchedule.from_config(cfg.schedule),
        scale_factor=cfg.scale_factor, config=cfg,
    )


@dataclass(frozen=True)
class RunShape:
    """What a run asks of the GPU (the ledger's inputs besides the model and the mode)."""

    height: int = 512
    width: int = 512
    batch: int = 1
    sampler: str = "dpm_solver"
    steps: int = 20
    scale: float = 7.5
    attention: str = "sdpa"
    tiled: bool = False
    unet_chunk: int | None = None
    img2img: bool = False  # the init image's encode (before sampling) is part of the run


Calls = Callable[..., None]
"""``calls(sd, residency, shape, device, phase)``: a run's calls on ``device`` (see :func:`run_generation_calls`)."""


def simulate(
    sd, mode: str, shape: RunShape = RunShape(), budget_bytes: int | None = None, calls: Calls | None = None
) -> LedgerRun:
    """Run ``shape`` with ``sd`` (models on ``meta``, e.g. from :func:`meta_stable_diffusion`) in ``mode``
    on the ``meta`` device, counting device bytes; the models are left as they were. ``calls`` is the run
    (default :func:`run_generation_calls`; ``optimizedSD.plan`` passes the generation loop's own stages)."""
    from ldm.attention import attention_backend
    from ldm.residency import Residency

    counter = DeviceBytes("meta")
    residency = Residency(sd, DEVICE, mode, budget_bytes, track_cpu_copies=True)
    groups = {group.name: group for group in residency.groups()}
    onloaded: dict[str, int] = {}

    def on_transfer(event) -> None:
        if event.event == "onload":
            counter.mark_weights(groups[event.group].tensors)
            onloaded[counter.current_phase] = onloaded.get(counter.current_phase, 0) + event.nbytes

    residency.on_transfer = on_transfer
    replay = CudaAttentionChoice()
    try:
        with attention_backend(shape.attention), replay, counter, torch.no_grad():
            (calls or run_generation_calls)(sd, residency, shape, DEVICE, counter.phase)
    finally:
        residency.release()
    return LedgerRun(mode, counter.peak, dict(counter.phase_peaks), dict(replay.choices), onloaded)


def run_generation_calls(sd, residency, shape: RunShape, device: torch.device, phase: Callable[[str], ContextManager]) -> None:
    """The generation loop's calls, in its order: the prompts (with the negative one, for guidance), one
    batch of sampling, each image's decode, under ``phase(name)`` for each phase. The ledger runs it on
    meta; ``scripts/gpu_check.py`` runs it on a GPU with random weights to check the ledger."""
    from ldm import samplers
    from ldm.guidance import GuidedDenoiser
    from ldm.streaming import chunked_unet
    from ldm.noise import SeededNoise
    from ldm.token_chunks import Fragment
    from ldm.vae_decoding import decode_latents

    dtype = next(sd.unet.parameters()).dtype
    guided = shape.scale != 1.0
    with phase("text_encoder"), residency.use("text_encoder") as text_encoder:  # as the prompt encoder calls it
        texts = ["a prompt", ""] if guided else ["a prompt"]
        embeddings = text_encoder.encode_chunks([text_encoder.chunk_prompt([Fragment(text)])[0] for text in texts])
    cond = embeddings[0].to(dtype).expand(shape.batch, *embeddings.shape[1:]).contiguous()
    uncond = embeddings[1].to(dtype).expand(shape.batch, *embeddings.shape[1:]).contiguous() if guided else None
    del embeddings

    cfg = sd.config
    posterior = None
    if shape.img2img:  # the init image's posterior, once (its pixels come from the host)
        with phase("vae"), residency.use("vae.encoder") as vae:
            posterior = vae.encode(torch.zeros(1, 3, shape.height, shape.width).to(device=device, dtype=dtype))
    latent_shape = (cfg.latent_channels, shape.height // cfg.downsampling_factor, shape.width // cfg.downsampling_factor)
    noise = SeededNoise(range(shape.batch))
    schedule = sd.schedule
    with phase("unet"), residency.use("unet") as unet:
        x_T = noise.initial(latent_shape, device=device)
        init_latent = None if posterior is None else sd.scale_factor * posterior.sample(noise(x_T)).float()
        latents = samplers.sample(
            shape.sampler, GuidedDenoiser(chunked_unet(unet, shape.unet_chunk), cond, uncond, shape.scale), schedule,
            x_T, shape.steps, init_latent=init_latent, strength=0.75 if shape.img2img else 1.0, noise_sampler=noise,
        )
    del cond, uncond, posterior
    with phase("vae"):
        for k in range(shape.batch):
            with residency.use("vae.decoder") as vae:
                images = decode_latents(vae, latents[k : k + 1] / sd.scale_factor, shape.tiled)
            del images
