"""Per-image seeded noise: image k of a batch is the image a single run with seed k would give.

One CPU ``torch.Generator`` per image, seeded once. Every draw is made in float32 on the CPU, one image at a
time from that image's own generator, and only then moved to the compute device and dtype. So the noise of
an image depends on its seed and on how many draws came before it, never on the batch size, the batch
position, the device (CUDA's generator gives other numbers than the CPU's) or the model dtype.

``SeededNoise.initial`` draws the start noise; calling the object (``noise(like)``) is the noise sampler the
ancestral samplers (``euler_a``, ``dpm2_a``, ``ddim`` with eta > 0) use for their fresh noise at each step.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class SeededNoise:
    """Gaussian noise from one CPU generator per image (``seeds[k]`` drives image ``k``)."""

    def __init__(self, seeds: Sequence[int]) -> None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("SeededNoise needs at least one seed")
        self.seeds = seeds
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def _draw(self, shape_per_image: Sequence[int]) -> Tensor:
        # Shape (1, *shape) per draw, as a single-image run with torch.randn((1, ...), generator=g) draws it.
        return torch.cat(
            [torch.randn((1, *shape_per_image), generator=g, dtype=torch.float32) for g in self.generators]
        )

    def initial(
        self, shape_per_image: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The start noise, ``[len(seeds), *shape_per_image]`` on ``device`` in ``dtype``."""
        return self._draw(tuple(shape_per_image)).to(device=device, dtype=dtype)

    def __call__(self, like: Tensor) -> Tensor:
        """The next noise for each image, shaped, placed and typed like ``like`` (whose batch is one per seed)."""
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]} asked from {len(self.generators)} seeds")
        return self._draw(tuple(like.shape[1:])).to(device=like.device, dtype=like.dtype)
