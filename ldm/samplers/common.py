"""What every sampler shares: the eps-model and callback types, the timestep tensor, the progress report.

An eps model is ``eps_model(x, t) -> eps`` with ``t`` a float32 tensor ``[B]`` (fractional timesteps allowed);
:class:`ldm.guidance.GuidedDenoiser` is the usual one. A noise sampler is ``noise_sampler(like) -> Tensor``,
fresh standard-normal noise shaped like ``like`` (``torch.randn_like`` or :class:`ldm.noise.SeededNoise`).

Progress: after each step a sampler calls ``callback(step, total, x)`` with the 0-based index of the step
just finished, the number of steps in this run and the current latent. To stop a run early, raise from the
callback (any exception, e.g. ``KeyboardInterrupt`` or the script's own): it propagates out of
:func:`ldm.samplers.sample` unchanged, and since samplers keep no state outside the call, nothing needs
cleaning up.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

EpsModel = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[Tensor], Tensor]
Callback = Callable[[int, int, Tensor], None]


def timestep_tensor(x: Tensor, t: float) -> Tensor:
    """The model's timestep argument: ``t`` for each image of ``x``, float32, on ``x``'s device."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def report(callback: Optional[Callback], step: int, total: int, x: Tensor) -> None:
    if callback is not None:
        callback(step, total, x)
