"""Random-weight ControlNets in the layouts people have (for the tiny model), the hint images the tests use, and
the oracle: diffusers' own ``ControlNetModel`` converted from the same file by diffusers' converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.config import load_model_config
from ldm.control.network import ControlNet
from ldm.control.units import control_config
from tests.reference import original_config


def random_control_state(config_path: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """A ControlNet 1.1 state dict (keys ``time_embed.*``, ``input_hint_block.*``, ``zero_convs.*``, ...) of the
    config's UNet, with random weights; the zero convs get weights too (a trained file's are not zero)."""
    torch.manual_seed(seed)
    net = ControlNet(control_config(load_model_config(config_path)))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out")):
                param.normal_(0, 0.3)
    return {k: v.clone() for k, v in net.state_dict().items()}


def save_v11(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def save_v10(state: dict[str, torch.Tensor], path: Path, base: dict[str, torch.Tensor] | None = None) -> Path:
    """ControlNet 1.0's layout: the same under ``control_model.``, with the base model's keys when ``base``."""
    full = {f"control_model.{k}": v for k, v in state.items()}
    full.update(base or {})
    torch.save({"state_dict": full}, path)
    return path


def hint_png(path: Path, width: int = 64, height: int = 64, seed: int = 3) -> Path:
    """A picture with shapes (so Canny finds edges) and some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), dtype=np.float64)
    image[..., 0] = 200 * ((xx - width / 3) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 4) ** 2)
    image[..., 1] = 180 * (xx > width * 0.6)
    image[..., 2] = 120 * (yy > height * 0.7)
    image += rng.normal(0, 10, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


def png_hint_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def diffusers_controlnet(state: dict[str, torch.Tensor], config_path: Path):
    """diffusers' ``ControlNetModel`` from a v1.1 (or 1.0) state dict, through diffusers' own converter."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm

    # diffusers 0.42's create_controlnet_diffusers_config_from_ldm calls the UNet's without its checkpoint
    # argument (a TypeError): the same fields, taken from the UNet config as that function does.
    unet = create_unet_diffusers_config_from_ldm(original_config(config_path), {})
    fields = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    cfg = {"conditioning_channels": 3, **{k: unet[k] for k in fields if k in unet}}
    model = ControlNetModel(**cfg)
    model.load_state_dict(convert_controlnet_checkpoint(state, cfg), strict=True)
    return model.eval()


def diffusers_control_pipeline(base, controlnets):
    """``StableDiffusionControlNetPipeline`` from a ``StableDiffusionPipeline``'s components (``base``: from
    tests/test_cli_vs_diffusers.py's ``diffusers_pipeline_from_checkpoint``) and ``controlnets``."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnets if len(controlnets) > 1 else controlnets[0], scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
