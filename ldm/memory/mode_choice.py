"""``--vram auto``: the fastest memory mode whose estimated peak fits the free device memory, and low mode's
budget of UNet weights that may stay on the device."""

from __future__ import annotations

import logging

import torch

from ldm.memory.estimates import DEVICE_RESERVE_BYTES, SAFETY, model_bytes, working_bytes
from ldm.memory.module_groups import tensors_of
from ldm.memory.residency import MODEL_NAMES, MODES, VRAM_CHOICES, unet_parts
from ldm.memory.streaming import unet_group_layout

log = logging.getLogger(__name__)


def resolve_mode(
    mode: str,
    device: torch.device | str,
    height: int,
    width: int,
    batch: int,
    *,
    sd=None,
    dtype: torch.dtype = torch.float16,
    free_bytes: int | None = None,
    tiled: bool = False,
    extra_bytes: int = 0,
) -> str:
    """``mode`` itself, or for "auto" the fastest mode whose estimated peak fits the free device memory.

    full needs all weights + the largest working memory; medium the largest (model + its working
    memory); anything less streams the UNet (low). Non-CUDA devices get "full". ``tiled``: the VAE will
    decode in tiles (``--vae_tiling``, or automatically for large images). ``extra_bytes``: the weights of
    the ``extra_models`` (the safety checker), on the device with the rest in full mode, alone in medium.
    """
    if mode != "auto":
        if mode not in MODES:
            raise ValueError(f"unknown vram mode {mode!r}; choose one of {', '.join(VRAM_CHOICES)}")
        return mode
    device = torch.device(device)
    if device.type != "cuda":
        return "full"
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    weights = model_bytes(sd, dtype)
    work = working_bytes(height, width, batch, dtype, tiled)
    full = sum(weights.values()) + extra_bytes + max(work.values())
    medium = max(max(weights[name] + work[name] for name in MODEL_NAMES), extra_bytes)
    for name, need in (("full", full), ("medium", medium)):
        if need * SAFETY + DEVICE_RESERVE_BYTES <= free_bytes:
            chosen = name
            break
    else:
        chosen = "low"
    log.info("vram auto: %.2f GB free -> %s mode", free_bytes / 2**30, chosen)
    return chosen


def auto_budget_bytes(
    device: torch.device | str, height: int, width: int, batch: int, *, sd=None, dtype: torch.dtype = torch.float16,
    free_bytes: int | None = None,
) -> int | None:
    """For low mode: the UNet weight bytes that may stay on the device besides the UNet's working memory,
    or None (stream everything) where that leaves nothing. The VAE does not count: low mode empties the
    UNet's groups off the device before the VAE comes on."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    work = working_bytes(height, width, batch, dtype)
    spare = int((free_bytes - DEVICE_RESERVE_BYTES) / SAFETY) - work["unet"]
    # Below the streaming window a budget would only turn prefetching off: streaming everything is faster.
    return spare if spare > streaming_window_bytes(sd, dtype) else None


def streaming_window_bytes(sd=None, dtype: torch.dtype = torch.float16) -> int:
    """The two largest UNet block groups: what low mode without a budget keeps on the device at once.
    Measured from ``sd`` when given, else SD v1's (22% of its UNet weights)."""
    if sd is None:
        return int(model_bytes(None, dtype)["unet"] * 0.22)
    parts = dict(unet_parts(sd.unet))
    sizes = sorted(
        (sum(t.numel() * t.element_size() for t in tensors_of([parts[n] for n in names]))
         for names in unet_group_layout(sd.unet)),
        reverse=True,
    )
    return sum(sizes[:2])
