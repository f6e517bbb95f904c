"""diffusers' StableDiffusionPipeline with everything resident (``pipe.to("cuda")``), run under the VRAM
ledger on the meta device: the figure our full mode must not exceed.

The pipeline's ``__call__`` cannot run on meta as a whole (its scheduler finds the step index with
``nonzero()``, which needs values), so its components are called as ``__call__`` calls them, in its
order: ``encode_prompt`` (negative and positive prompt through the CLIP text model, concatenated), at each
step the UNet on the doubled latents with the guidance formula and the scheduler's update (latent-sized
arithmetic), then ``vae.decode(latents / scaling_factor)`` of the whole batch and the postprocessing's
denormalisation. Attention runs through diffusers' own ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``),
replayed as CUDA would run it by the same :class:`CudaAttentionChoice` as ours.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.ledger import CudaAttentionChoice, DeviceBytes, LedgerRun
from tests.reference import original_config


def diffusers_models_on_meta(config_path: Path, dtype: torch.dtype = torch.float16):
    """diffusers' UNet and VAE and transformers' CLIP text model for ``config_path``, on meta, in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as convert
    from transformers import CLIPTextModel

    from ldm.models.autoencoder import AutoencoderKL as OurVAE
    from ldm.config import load_model_config
    from ldm.loading.random_weights import compvis_state_dict
    from ldm.conditioning.text_encoder import CLIPTextEncoder, clip_text_config
    from ldm.models.unet import UNetModel

    cfg = load_model_config(config_path)
    with torch.device("meta"):  # our models only give the converters the checkpoint's shapes
        state = compvis_state_dict(UNetModel(cfg.unet), OurVAE(cfg.vae), CLIPTextEncoder(cfg.text), cfg)
        original = original_config(config_path)
        unet = UNet2DConditionModel(**convert.create_unet_diffusers_config_from_ldm(original, state))
        vae = AutoencoderKL(**convert.create_vae_diffusers_config_from_ldm(original, state))
        text = CLIPTextModel(clip_text_config(cfg.text))
    return [model.to(dtype).eval().requires_grad_(False) for model in (text, unet, vae)]


def diffusers_resident_run(config_path: Path, height: int, width: int, steps: int = 3, batch: int = 1) -> LedgerRun:
    """The resident pipeline's simulated peak for one batch with guidance (scale 7.5)."""
    text, unet, vae = diffusers_models_on_meta(config_path)
    counter, replay = DeviceBytes("meta"), CudaAttentionChoice()
    with replay, counter, torch.no_grad():
        weights = [t for model in (text, unet, vae) for t in list(model.parameters()) + list(model.buffers())]
        for tensor in weights:  # pipe.to(device): one device copy of every weight
            tensor.data = tensor.data.clone()
        counter.mark_weights(weights)
        with counter.phase("text_encoder"):
            ids = torch.zeros(1, 77, dtype=torch.long).to("meta")
            negative = text(ids.expand(batch, -1))[0]
            positive = text(ids.expand(batch, -1))[0]
            embeddings = torch.cat([negative, positive])
            del negative, positive
        with counter.phase("unet"):
            latents = torch.randn(batch, 4, height // 8, width // 8).to("meta", torch.float16)
            for step in range(steps):
                t = torch.tensor(999 - 50 * step).to("meta")
                noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeddings).sample
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + 7.5 * (cond - uncond)
                latents = latents - 0.1 * noise_pred  # the scheduler's update: latent-sized arithmetic
                del noise_pred, uncond, cond
        with counter.phase("vae"):
            image = vae.decode(latents / vae.config.scaling_factor).sample
            image = (image / 2 + 0.5).clamp(0, 1)
    return LedgerRun("diffusers resident", counter.peak, dict(counter.phase_peaks), dict(replay.choices))


