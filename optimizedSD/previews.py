"""``--preview_every N``: the running image of each batch written every N sampler steps, as the webui's live
preview shows it (:mod:`ldm.models.latent_preview`: TAESD when it is the run's VAE, else the weight-free
approximation at an eighth of the size), to ``OUTDIR/previews/seed_S_step_K.png``; a name already taken gets a
number, so no file is overwritten."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ldm.models.latent_preview import preview_image
from ldm.models.taesd import TinyAutoencoder
from optimizedSD.atomic_files import write_new_file
from optimizedSD.outputs import to_uint8


class PreviewWriter:
    """``writer(step, total, x)`` from the progress callback: writes every ``every``-th step's images."""

    def __init__(self, folder: Path, every: int, seeds: list[int], vae) -> None:
        self.folder, self.every, self.seeds = folder, every, seeds
        self.tiny_vae = vae if isinstance(vae, TinyAutoencoder) else None

    def __call__(self, step: int, total: int, x: torch.Tensor) -> None:
        if (step + 1) % self.every:
            return
        latents = x
        if self.tiny_vae is not None:
            latents = x.to(next(self.tiny_vae.parameters()).device)
        pixels = to_uint8(preview_image(latents, self.tiny_vae))
        self.folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(self.seeds, pixels):
            write_png(self.folder / f"seed_{seed}_step_{step + 1:03d}.png", image)


def write_png(path: Path, image) -> Path:
    """``path``, or ``stem_2.png``, ``stem_3.png``, ... when taken."""
    candidate, number = path, 1
    while True:
        try:
            return write_new_file(candidate, lambda handle: Image.fromarray(image).save(handle, format="PNG"))
        except FileExistsError:
            number += 1
            candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
