"""Classifier-free guidance: the one adapter between the UNet and every sampler.

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance", eq. 6, in the form CompVis' samplers use::

    eps = eps_uncond + scale * (eps_cond - eps_uncond)

The samplers only ever see ``eps_model(x, t) -> eps``; how the network is called lives here (the idea of
DPM-Solver's ``model_wrapper``): both passes in one batch of ``2B`` (the default, fastest), or one after the
other (``batched=False``, the low-VRAM path: half the activation memory, the same result up to float
rounding). With ``scale == 1`` the formula reduces to ``eps_cond``, so the unconditional pass is skipped.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

UNet = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``unet(x [B,C,h,w], t float [B], context [B,77,D]) -> eps [B,C,h,w]``."""


class GuidedDenoiser:
    """``eps_model(x, t)`` for a UNet, a conditioning and (for ``scale != 1``) an unconditional conditioning.

    ``cond`` and ``uncond`` are text embeddings ``[B, 77, D]`` with the batch of ``x``
    (``uncond`` may be ``None`` when ``scale == 1``).
    """

    def __init__(
        self, unet: UNet, cond: Tensor, uncond: Tensor | None = None, scale: float = 7.5, batched: bool = True
    ) -> None:
        if scale != 1.0 and uncond is None:
            raise ValueError(f"guidance scale {scale} needs an unconditional conditioning (uncond)")
        if uncond is not None and uncond.shape != cond.shape:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ in shape")
        self.unet = unet
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.batched = batched

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != self.cond.shape[0]:
            raise ValueError(f"latent batch {x.shape[0]} does not match conditioning batch {self.cond.shape[0]}")
        # The UNet runs in the conditioning's dtype (fp16 models); the sampler's latent keeps its own (fp32).
        return self._eps(x.to(self.cond.dtype), t).to(x.dtype)

    def _eps(self, x: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.unet(x, t, self.cond)
        if self.batched:
            # CompVis order: unconditional first, conditional second.
            eps_uncond, eps_cond = self.unet(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, self.cond])
            ).chunk(2)
        else:
            eps_uncond = self.unet(x, t, self.uncond)
            eps_cond = self.unet(x, t, self.cond)
        return eps_uncond + self.scale * (eps_cond - eps_uncond)
