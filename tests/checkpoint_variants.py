"""Files users download, rebuilt from a tiny random SD v1 state dict with the key names real files use.

Each builder takes the canonical CompVis state dict and returns what another tool would have saved:
SD 2.x (OpenCLIP under ``cond_stage_model.model.``, as Stability's ``v2-1_512-ema-pruned``), SDXL
(``conditioner.embedders.*`` and the UNet's ``label_emb``, as ``sd_xl_base_1.0``), a kohya / PEFT LoRA,
a VAE alone (``vae-ft-mse-840000-ema-pruned``: bare keys plus its training loss), a file without VAE,
an EMA-only file (LitEma names only).
"""

from __future__ import annotations

import torch

from ldm.checkpoints.layout import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_key


def without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def vae_only(state: dict, prefix: str = "") -> dict:
    return {prefix + k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}


def with_vae(state: dict, vae: dict) -> dict:
    """``state`` with its VAE replaced by ``vae`` (CompVis keys without prefix)."""
    return {**without(state, VAE_PREFIX), **{VAE_PREFIX + k: v for k, v in vae.items()}}


def vae_training_loss(width: int = 8) -> dict:
    """The ``loss.*`` entries a VAE fine-tune carries: learned logvar, LPIPS and a patch discriminator."""
    return {
        "loss.logvar": torch.zeros(()),
        "loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(width, 3, 3, 3),
        "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, width, 1, 1),
        "loss.discriminator.main.0.weight": torch.zeros(width, 3, 4, 4),
        "loss.discriminator.main.0.bias": torch.zeros(width),
    }


def sd2(state: dict) -> dict:
    """OpenCLIP ViT-H text tower in place of CLIP's (a few of its keys suffice), UNet context 1024."""
    out = without(state, TEXT_PREFIX)
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.ln_1.weight"):
        out["cond_stage_model.model." + key] = torch.zeros(4, 4)
    return out


def sd2_diffusers_like(state: dict) -> dict:
    """SD 2.x seen through a converter that kept CLIP-style keys: only the 1024-wide context tells."""
    out = dict(state)
    for key in [k for k in state if k.startswith(UNET_PREFIX) and k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]:
        out[key] = torch.zeros(state[key].shape[0], 1024)
    return out


def sdxl(state: dict) -> dict:
    out = without(state, TEXT_PREFIX)
    out[UNET_PREFIX + "label_emb.0.0.weight"] = torch.zeros(8, 2816)
    out["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(4)
    out["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    return out


def kohya_lora() -> dict:
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.zeros(4, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.zeros(32, 4),
    }


def peft_lora() -> dict:
    return {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(4, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.zeros(32, 4),
    }


def ema_only(state: dict, shift: float = 1.0) -> dict:
    """The UNet only as LitEma's copy (``model_ema.diffusion_model*``), its values shifted by ``shift``."""
    out = without(state, UNET_PREFIX)
    for key in [k for k in state if k.startswith(UNET_PREFIX)]:
        out[ema_key(key[len(UNET_PREFIX):])] = state[key] + shift
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def cast(state: dict, dtype: torch.dtype) -> dict:
    """Every floating tensor in ``dtype``, the schedule buffers too (what converters' "fp16"/"bf16" do)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
