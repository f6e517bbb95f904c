"""Per-image seeded noise: image k of a batch is the image a single run with seed k would give.

One generator per image, seeded once: ``rng="cpu"`` a CPU ``torch.Generator`` (the webui's "RNG: CPU"),
``rng="gpu"`` CUDA's ``torch.randn`` computed here on any device (:class:`PhiloxGenerator` below,
the webui's "RNG: NV", the numbers of its default "RNG: GPU" on an NVIDIA card). Every draw is made in float32
on the CPU, one image at a time from that image's own generator, and only then moved to the compute device
and dtype. So the noise of an image depends on its seed and on how many draws came before it, never on the
batch size, the batch position, the device or the model dtype.

``SeededNoise.initial`` draws the start noise as the webui's ``ImageRNG.first`` does: with a variation seed,
the slerp of the seed's noise and the subseed's (:func:`slerp`); with ``seed_resize_from``, the noise drawn at
that size and pasted, centred, into the image's own. Calling the object (``noise(like)``) then continues each
image's generator: img2img's posterior sample and the ancestral samplers' fresh noise (``euler_a``, ``dpm2_a``,
``ddim`` with eta > 0). With ``ensd`` (the webui's eta noise seed delta), those later draws come from a new
generator seeded with ``seed + ensd``. The SDE samplers read ``seeds`` and ``rng`` for their Brownian trees.

Philox (``rng="gpu"``): cUDA's ``torch.randn`` on any device: the Philox4x32-10 counter-based generator, as the webui's "RNG: NV".

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

RNG_MODES = ("cpu", "gpu")


# ---- Philox4x32-10: CUDA's torch.randn on any device --------------------------------------------------------
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


# ---- per-image generators -----------------------------------------------------------------------------------
class CpuGenerator:
    """``torch.randn`` from a CPU generator seeded with ``seed`` (float32)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def randn(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


def make_generator(rng: str, seed: int) -> CpuGenerator | PhiloxGenerator:
    """A fresh generator of the RNG mode ``rng`` (``cpu`` or ``gpu``) seeded with ``seed``."""
    if rng == "cpu":
        return CpuGenerator(seed)
    if rng == "gpu":
        return PhiloxGenerator(seed)
    raise ValueError(f"unknown RNG mode {rng!r}; expected one of {', '.join(RNG_MODES)}")


def slerp(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """The webui's variation-seed blend (``modules/rng.py``) of ``(C, H, W)`` noises: spherical interpolation
    with the norms taken over dim 1, ``strength`` 0 giving ``low``; nearly parallel noises blend linearly
    (with the webui's weights, ``low * strength + high * (1 - strength)``)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + (torch.sin(strength * omega) / so).unsqueeze(1) * high


def paste_centred(target: Tensor, noise: Tensor) -> Tensor:
    """``noise`` (C, h, w) pasted into ``target`` (C, H, W), centred, cropped where it is larger (the webui's
    ``Seed resize from``)."""
    dx, dy = (target.shape[2] - noise.shape[2]) // 2, (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return target


class SeededNoise:
    """Gaussian noise from one generator per image (``seeds[k]`` drives image ``k``).

    ``subseeds``/``subseed_strength``: variation seeds (image ``k`` blends in ``subseeds[k]``'s noise);
    ``seed_resize_from``: ``(width, height)`` in pixels the seed's noise is drawn at; ``ensd``: the seed delta of
    every draw after the start noise.
    """

    def __init__(self, seeds: Sequence[int], rng: str = "cpu", *, subseeds: Sequence[int] = (),
                 subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None,
                 ensd: int = 0) -> None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("SeededNoise needs at least one seed")
        self.seeds, self.rng = seeds, rng
        self.subseeds = [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from = seed_resize_from
        self.ensd = int(ensd)
        self.generators = [make_generator(rng, s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def _draw(self, shape_per_image: Sequence[int]) -> Tensor:
        # One (C, H, W) draw per image: the numbers torch.randn((1, C, H, W), generator=g) gives too.
        return torch.stack([g.randn(shape_per_image) for g in self.generators])

    def _first(self, k: int, shape: tuple[int, ...]) -> Tensor:
        """Image ``k``'s start noise (the webui's ``ImageRNG.first`` for one image)."""
        seed, generator = self.seeds[k], self.generators[k]
        noise_shape = shape
        if self.seed_resize_from is not None:
            width, height = self.seed_resize_from
            noise_shape = (shape[0], height // 8, width // 8)
        noise = generator.randn(shape) if noise_shape == shape else make_generator(self.rng, seed).randn(noise_shape)
        if self.subseed_strength != 0:
            subseed = self.subseeds[k] if k < len(self.subseeds) else 0
            noise = slerp(self.subseed_strength, noise, make_generator(self.rng, subseed).randn(noise_shape))
        if noise_shape != shape:
            noise = paste_centred(generator.randn(shape), noise)
        return noise

    def initial(
        self, shape_per_image: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The start noise, ``[len(seeds), *shape_per_image]`` on ``device`` in ``dtype``."""
        shape = tuple(int(n) for n in shape_per_image)
        noise = torch.stack([self._first(k, shape) for k in range(len(self.seeds))])
        if self.ensd:
            self.generators = [make_generator(self.rng, s + self.ensd) for s in self.seeds]
        return noise.to(device=device, dtype=dtype)

    def __call__(self, like: Tensor) -> Tensor:
        """The next noise for each image, shaped, placed and typed like ``like`` (whose batch is one per seed)."""
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]} asked from {len(self.generators)} seeds")
        return self._draw(tuple(like.shape[1:])).to(device=like.device, dtype=like.dtype)
