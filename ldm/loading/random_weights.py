"""Random-weight checkpoints in the real SD v1 key layout.

No real weights can be downloaded where this project is tested, so tests (and newcomers) build their
own: every key a real ``sd-v1-*.ckpt`` holds, with the same shapes for the same config, including the
DDPM schedule buffers and the CLIP ``position_ids``. The images such a model makes are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.checkpoints.layout import SCHEDULE_BUFFERS, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.config import ModelConfig, ScheduleConfig
from ldm.samplers.schedule import make_betas
from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.models.unet import UNetModel

__all__ = ["UNET_PREFIX", "VAE_PREFIX", "TEXT_PREFIX", "ddpm_schedule_buffers", "compvis_state_dict",
           "random_state_dict", "save_checkpoint"]


def ddpm_schedule_buffers(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    """The buffers CompVis' ``DDPM.register_schedule`` saves, computed the same way (float64, stored float32)."""
    betas = make_betas(cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    assert tuple(buffers) == SCHEDULE_BUFFERS
    return {name: values.float() for name, values in buffers.items()}


def compvis_state_dict(
    unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextEncoder, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The three modules' weights under the key names a real SD v1 file uses, plus the schedule buffers."""
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    for key, value in text_encoder.transformer.state_dict().items():
        # Real SD v1 files spell the CLIP keys with transformers 4.x's `text_model.` prefix.
        key = key if key.startswith("text_model.") else "text_model." + key
        state[TEXT_PREFIX + key] = value
    positions = cfg.text.max_position_embeddings
    state[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    state.update(ddpm_schedule_buffers(cfg.schedule))
    return state


@torch.no_grad()
def random_state_dict(cfg: ModelConfig, seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A full SD v1-layout state dict with random weights (fp32), deterministic for ``seed``.

    Each weight is its module's default initialisation plus ``scale`` times Gaussian noise, so norm
    weights, biases and CompVis' zero-initialised output convs are all non-trivial.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextEncoder(cfg.text)
    for module in modules:
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return {k: v.contiguous() for k, v in compvis_state_dict(*modules, cfg).items()}


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` as ``.safetensors`` or as a CompVis-style ``.ckpt`` (``{"state_dict": ...}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path
