"""diffusers' ``StableDiffusionControlNetPipeline`` with everything resident (``pipe.to("cuda")``), under the VRAM
ledger on the meta device: the figure our full mode with one ControlNet must not exceed.

As tests/ledger_reference.py (whose models it reuses), the pipeline's components are called in its ``__call__``'s
order, since the scheduler cannot run on meta: the prompts, then at each step the ControlNet on the doubled
latents with the doubled hint (``[2B, 3, H, W]``, fp16), its residuals times the conditioning scale into the UNet
(``down_block_additional_residuals``, ``mid_block_additional_residual``), guidance and the update, then the decode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.ledger import CudaAttentionChoice, DeviceBytes, LedgerRun
from tests.ledger_reference import diffusers_models_on_meta
from tests.reference import original_config

CONTROL_FIELDS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                  "attention_head_dim", "use_linear_projection")


def diffusers_controlnet_on_meta(config_path: Path, dtype: torch.dtype = torch.float16):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    unet = create_unet_diffusers_config_from_ldm(original_config(config_path), {})
    with torch.device("meta"):
        model = ControlNetModel(conditioning_channels=3, **{k: unet[k] for k in CONTROL_FIELDS})
    return model.to(dtype).eval().requires_grad_(False)


def diffusers_control_resident_run(config_path: Path, height: int, width: int, steps: int = 3,
                                   batch: int = 1) -> LedgerRun:
    """The resident ControlNet pipeline's simulated peak for one batch with guidance (scale 7.5), one ControlNet."""
    text, unet, vae = diffusers_models_on_meta(config_path)
    controlnet = diffusers_controlnet_on_meta(config_path)
    counter, replay = DeviceBytes("meta"), CudaAttentionChoice()
    with replay, counter, torch.no_grad():
        models = (text, unet, vae, controlnet)
        weights = [t for model in models for t in list(model.parameters()) + list(model.buffers())]
        for tensor in weights:  # pipe.to(device)
            tensor.data = tensor.data.clone()
        counter.mark_weights(weights)
        with counter.phase("text_encoder"):
            ids = torch.zeros(1, 77, dtype=torch.long).to("meta")
            embeddings = torch.cat([text(ids.expand(batch, -1))[0], text(ids.expand(batch, -1))[0]])
        hint = torch.zeros(2 * batch, 3, height, width).to("meta", torch.float16)  # prepare_image, doubled for CFG
        with counter.phase("unet"):
            latents = torch.randn(batch, 4, height // 8, width // 8).to("meta", torch.float16)
            for step in range(steps):
                t = torch.tensor(999 - 50 * step).to("meta")
                doubled = torch.cat([latents] * 2)
                down, mid = controlnet(doubled, t, encoder_hidden_states=embeddings, controlnet_cond=hint,
                                       conditioning_scale=1.0, return_dict=False)
                noise_pred = unet(doubled, t, encoder_hidden_states=embeddings, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
                del down, mid, doubled
                uncond, cond = noise_pred.chunk(2)
                latents = latents - 0.1 * (uncond + 7.5 * (cond - uncond))
                del noise_pred, uncond, cond
        with counter.phase("vae"):
            image = vae.decode(latents / vae.config.scaling_factor).sample
            image = (image / 2 + 0.5).clamp(0, 1)
    return LedgerRun("diffusers resident + ControlNet", counter.peak, dict(counter.phase_peaks), dict(replay.choices))
