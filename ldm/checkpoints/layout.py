"""Key names of a CompVis SD v1 checkpoint: which prefix holds which model, and what the loader drops.

A CompVis ``LatentDiffusion`` state dict (``sd-v1-*.ckpt``) holds

- ``model.diffusion_model.*``: the UNet (``DiffusionWrapper.diffusion_model``);
- ``first_stage_model.*``: the VAE (``AutoencoderKL``), sometimes with its training loss under ``loss.``;
- ``cond_stage_model.transformer.*``: the CLIP text model (``FrozenCLIPEmbedder.transformer``);
- ``model_ema.*``: LitEma's shadow copy of the UNet, named with the dots removed
  (``model_ema.diffusion_modelinput_blocks00weight``), plus its ``decay`` / ``num_updates`` counters;
- the DDPM schedule buffers ``DDPM.register_schedule`` saves (``betas``, ``alphas_cumprod``, ...).

Shared by the loader, the checkpoint classifier and the random-checkpoint writer.
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."
# LitEma's name for the UNet's weights: "model_ema." + ("diffusion_model." + key) without dots.
EMA_UNET_PREFIX = EMA_PREFIX + "diffusion_model"

# What CompVis' DDPM.register_schedule stores (all derived from the config's betas).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Training leftovers inference has no use for, dropped without a word: EMA bookkeeping, the learned
# logvar, conditioning-schedule and loss-weight buffers, and the VAE's training loss (VAE fine-tunes
# ship their discriminator and LPIPS net under ``loss.``).
TRAINING_LEFTOVER_KEYS = frozenset(
    {"model_ema.decay", "model_ema.num_updates", "logvar", "cond_ids", "scale_factor", "lvlb_weights"}
)
VAE_LOSS_PREFIX = "loss."

# Text-encoder keys some tools save (ComfyUI, kohya: CLIP's projection head and temperature) that SD v1
# never uses: its conditioning is the last hidden state, before any projection.
UNUSED_TEXT_KEYS = frozenset({"text_projection.weight", "text_projection", "logit_scale"})


def ema_key(unet_key: str) -> str:
    """LitEma's name for a UNet weight: ``input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def is_unused_text_key(key: str) -> bool:
    """``key`` (with ``cond_stage_model.transformer.`` stripped) is CLIP's projection head or temperature."""
    return key.removeprefix("text_model.") in UNUSED_TEXT_KEYS
