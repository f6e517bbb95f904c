"""PLMS: Liu, Ren, Lin & Zhao (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds", as CompVis
``plms.py`` (diffusers ``PNDMScheduler(skip_prk_steps=True)``).

The DDIM update (eq. 12 of Song et al., :func:`ldm.samplers.ddim.ddim_update`, eta = 0) taken with an eps
extrapolated from the previous steps' eps by linear multistep (Adams-Bashforth) coefficients. The first step
has no history, so it uses the pseudo improved Euler step: the average of the eps at ``x_t`` and the eps at
the DDIM prediction of the next level (one extra model call). Same grid as DDIM.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ldm.samplers.common import Callback, ScheduledEps, report
from ldm.samplers.ddim import ddim_update

# Adams-Bashforth weights of (eps_now, eps_prev, eps_prev2, eps_prev3), by number of stored eps (1..3).
_ADAMS_BASHFORTH = {
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_plms(
    model: ScheduledEps,
    x: Tensor,
    levels: Sequence[int],
    *,
    callback: Callback | None = None,
) -> Tensor:
    """PLMS from ``x`` at timestep ``levels[0]`` down the descending ``levels`` (deterministic, eta = 0)."""
    old_eps: list[Tensor] = []  # newest last, at most 3
    total = len(levels) - 1
    for i in range(total):
        t, t_prev = levels[i], levels[i + 1]
        a_t, a_prev = model.alpha_bar(t), model.alpha_bar(t_prev)
        eps = model.eps(x, t)
        if not old_eps:
            # Pseudo improved Euler. CompVis evaluates the second eps at the next DDIM timestep; on a one-step
            # walk it reuses t itself, here it is the next level (0), the timestep that x_pred is at.
            x_pred = ddim_update(x, eps, a_t, a_prev)
            eps_prime = (eps + model.eps(x_pred, t_prev)) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(old_eps)]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(old_eps)]))
        x = ddim_update(x, eps_prime, a_t, a_prev)
        old_eps = [*old_eps, eps][-3:]
        x = report(callback, i, total, x)
    return x
