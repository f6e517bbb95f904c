"""Live previews of SD v1 latents without the VAE: the webui's "Approx cheap" (``modules/sd_vae_approx.py``,
``cheap_approximation``), one linear map from the 4 latent channels to RGB at the latent's own size (an eighth
of the image's side), no weights to load. With a TAESD as ``--vae`` the preview is that decoder's instead
(:func:`preview_image`)."""

from __future__ import annotations

import torch

# The webui's coefficients (rows: latent channels, columns: R, G, B), fitted on SD v1 latents.
CHEAP_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def cheap_approximation(latents: torch.Tensor) -> torch.Tensor:
    """UNet latents [B, 4, h, w] (scaled, as the sampler holds them) -> images [B, 3, h, w], about [-1, 1]."""
    coefficients = torch.tensor(CHEAP_RGB, dtype=torch.float32, device=latents.device)
    return torch.einsum("blxy,lr->brxy", latents.float(), coefficients)


@torch.no_grad()
def preview_image(latents: torch.Tensor, tiny_vae=None) -> torch.Tensor:
    """The running images in [-1, 1]: ``tiny_vae`` (a :class:`ldm.models.taesd.TinyAutoencoder` on the latents'
    device) decodes them at full size, else :func:`cheap_approximation` at the latent's size."""
    if tiny_vae is not None:
        return tiny_vae.decode(latents).float().clamp(-1, 1)
    return cheap_approximation(latents).clamp(-1, 1)
