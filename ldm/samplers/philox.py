"""CUDA's ``torch.randn`` on any device: the Philox4x32-10 counter-based generator, as the webui's "RNG: NV".

A GPU run of the webui (its default "RNG: GPU") draws its noise with ``torch.randn(..., device="cuda")``.
CUDA's generator is Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):
element ``i`` of a draw is the first 32-bit pair of Philox applied to the counter ``(offset, 0, i, 0)`` with the
key ``(seed & 0xFFFFFFFF, seed >> 32)``, turned into a normal number by Box-Muller (the sine output; the
cosine one is thrown away). Each draw moves ``offset`` on by one. The rounds, constants and float scaling
below are those the webui's ``modules/rng_philox.py`` uses (Box-Muller computed in float64, see
:func:`box_muller_sine`), which give CUDA's float32 values to about 1e-7;
its published check, seed 0 and shape (3, 4), begins -0.92466259 -0.42534415 -2.6438457 0.14518388.

Vectorised in numpy uint64 arithmetic: a 4x64x64 latent takes a few milliseconds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
_WORD = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_TWO_POW32_INV = float(np.float32(2.3283064e-10))  # CUDA's CURAND_2POW32_INV


def philox4x32(counter: Sequence[np.ndarray], key: tuple[int, int], rounds: int = ROUNDS) -> list[np.ndarray]:
    """Philox4x32 of the four 32-bit counter words (uint64 arrays holding 32-bit values) under ``key``."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) for word in counter)
    k0, k1 = key
    m0, m1 = np.uint64(MULTIPLIERS[0]), np.uint64(MULTIPLIERS[1])
    for round_index in range(rounds):
        if round_index:
            k0 = (k0 + KEY_INCREMENTS[0]) & 0xFFFFFFFF
            k1 = (k1 + KEY_INCREMENTS[1]) & 0xFFFFFFFF
        p0, p1 = c0 * m0, c2 * m1  # 32 x 32 bits: exact in uint64
        c0, c1, c2, c3 = (p1 >> _SHIFT) ^ c1 ^ np.uint64(k0), p1 & _WORD, (p0 >> _SHIFT) ^ c3 ^ np.uint64(k1), p0 & _WORD
    return [c0, c1, c2, c3]


def box_muller_sine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The sine output of Box-Muller on two uniform 32-bit words, rounded to float32.

    The uniforms are curand's, ``(word + 1/2) * 2**-32``; the rest is computed in float64 with an exact 2 pi
    (the webui multiplies by float32's 2 pi, which moves a value by up to ~3e-7): against the published CUDA
    values this is within 1.1e-7, the webui's own arithmetic within 2.7e-7."""
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(2 * np.pi * v)).astype(np.float32)


class PhiloxGenerator:
    """``torch.randn`` of a CUDA generator seeded with ``seed``: ``PhiloxGenerator(seed).randn(shape)``."""

    def __init__(self, seed: int) -> None:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.seed = seed
        self.key = (seed & 0xFFFFFFFF, seed >> 32)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> Tensor:
        """The next draw, float32 on the CPU; the offset moves on by one per draw, whatever its size."""
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError(f"a draw of {n} numbers is more than Philox's 2**32 counter words hold")
        index = np.arange(n, dtype=np.uint64)
        zeros = np.zeros(n, dtype=np.uint64)
        words = philox4x32((np.full(n, self.offset, dtype=np.uint64), zeros, index, zeros), self.key)
        self.offset += 1
        return torch.from_numpy(box_muller_sine(words[0], words[1]).reshape(tuple(shape)))
