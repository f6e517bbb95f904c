"""The VRAM ledger: the peak device memory of a run, known before the run, from the config alone.

:func:`simulate` builds the three models on PyTorch's ``meta`` device (shapes, no weights, no memory) and
runs the generator's own code on ``meta`` as the compute device: :class:`~ldm.memory.residency.Residency` in the
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

import torch

from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.config import load_model_config
from ldm.ledger.attention_replay import CudaAttentionChoice
from ldm.ledger.calls import generation_calls
from ldm.ledger.counting import DeviceBytes, Peak
from ldm.ledger.shapes import Calls, RunShape
from ldm.loading.stable_diffusion import StableDiffusion
from ldm.memory.residency import Residency
from ldm.models.attention import attention_backend
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.taesd import TinyAutoencoder
from ldm.models.quantize import quantize_unet
from ldm.models.token_merging import apply_token_merging
from ldm.models.unet import UNetModel
from ldm.samplers.schedule import DiffusionSchedule

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
                          tome: float | None = None, taesd: bool = False):
    """SD v1 (or any config's) three models on ``meta`` in ``dtype``, as :func:`load_stable_diffusion`
    would return them from a checkpoint: the same modules, the same parameter dtypes, no data. With
    ``quantize`` ("int8") and ``tome`` (a ratio) the UNet is changed as the generation loop changes it
    (:func:`ldm.pipeline.model.speed_up_unet`): int8 weights (and their per-call dequantized copies) and
    merged tokens are what the ledger then counts. ``taesd``: the tiny autoencoder in the VAE's place, as
    ``--vae`` with a TAESD file loads it (scale factor 1)."""

    cfg = load_model_config(config) if not hasattr(config, "unet") else config
    with torch.device("meta"):
        unet, text_encoder = UNetModel(cfg.unet), CLIPTextEncoder(cfg.text)
        vae = TinyAutoencoder() if taesd else AutoencoderKL(cfg.vae)
    for module in (unet, vae, text_encoder):
        module.to(dtype).eval().requires_grad_(False)
    if quantize:
        quantize_unet(unet, quantize)
    apply_token_merging(unet, tome)
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text_encoder,
        schedule=DiffusionSchedule.from_config(cfg.schedule),
        scale_factor=1.0 if taesd else cfg.scale_factor, config=cfg,
    )


def simulate(
    sd, mode: str, shape: RunShape = RunShape(), budget_bytes: int | None = None, calls: Calls | None = None
) -> LedgerRun:
    """Run ``shape`` with ``sd`` (models on ``meta``, e.g. from :func:`meta_stable_diffusion`) in ``mode``
    on the ``meta`` device, counting device bytes; the models are left as they were. ``calls`` is the run
    (default :func:`~ldm.ledger.calls.generation_calls` of a request with the scripts' defaults; ``--plan`` passes
    the run's own request)."""
    counter = DeviceBytes("meta")
    residency = Residency(sd, DEVICE, mode, budget_bytes, track_cpu_copies=True)
    groups = {group.name: group for group in residency.groups()}
    onloaded: dict[str, int] = {}

    def on_transfer(event) -> None:
        if event.event == "onload":
            if event.group not in groups:  # attached after the start (a ControlNet's, ldm/control)
                groups.update((group.name, group) for group in residency.groups())
            counter.mark_weights(groups[event.group].tensors)
            onloaded[counter.current_phase] = onloaded.get(counter.current_phase, 0) + event.nbytes

    residency.on_transfer = on_transfer
    calls = calls or generation_calls()
    prepare = getattr(calls, "prepare", None)
    if prepare is not None:  # what the run holds on the host from its start (generation_calls' ControlNets)
        prepare(sd, residency, shape)
    replay = CudaAttentionChoice()
    try:
        with attention_backend(shape.attention), replay, counter, torch.no_grad():
            calls(sd, residency, shape, DEVICE, counter.phase)
    finally:
        residency.release()
    return LedgerRun(mode, counter.peak, dict(counter.phase_peaks), dict(replay.choices), onloaded)
