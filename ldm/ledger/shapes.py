"""What a simulated run asks of the GPU besides the model and the memory mode, and the calls that make it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
"""``calls(sd, residency, shape, device, phase)``: a run's calls on ``device`` under ``phase(name)`` for each phase
(:func:`ldm.ledger.calls.generation_calls`: the generation stages)."""
