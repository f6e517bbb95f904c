"""Random LoRA / LoHa / LoKr files in the real key layouts, for the LoRA tests.

The key names come from the reference models' own module names (diffusers' ``UNet2DConditionModel`` and
transformers' ``CLIPTextModel``), as kohya's sd-scripts and diffusers name them when they train, or from our
CompVis-layout UNet for the sgm spelling; never from ``ldm.loading.lora_layouts``, which they test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TEXT_MODEL = "text_model."


def layers(model: nn.Module, every: int = 1) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d layers of ``model`` (every ``every``-th one), names without ``text_model.``."""
    found = [(n.removeprefix(TEXT_MODEL), m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return found[::every]


def shapes(module: nn.Module) -> tuple[tuple[int, ...], int, int]:
    """(kernel, in, out) of a Linear or Conv2d."""
    if isinstance(module, nn.Linear):
        return (), module.in_features, module.out_features
    return tuple(module.kernel_size), module.in_channels, module.out_channels


def lora_pair(module: nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as kohya shapes them: conv down carries the layer's kernel, conv up is 1x1."""
    kernel, fan_in, fan_out = shapes(module)
    one = (1,) * len(kernel)
    down = torch.randn((rank, fan_in, *kernel), generator=g) * 0.1
    up = torch.randn((fan_out, rank, *one), generator=g) * 0.1
    return down, up


def kohya_lora(
    named_unet: list[tuple[str, nn.Module]],
    named_text: list[tuple[str, nn.Module]],
    seed: int,
    te_prefix: str = "lora_te_text_model_",
    rank: int = 3,
    alphas: tuple[float, float] = (4.0, 1.0),
) -> dict[str, torch.Tensor]:
    """kohya / webui layout: ``lora_unet_<name_>.lora_down.weight`` ... with ``alpha``.

    ``alphas``: (network_alpha for Linear and 1x1 conv layers, conv_alpha for 3x3 conv layers), as sd-scripts
    writes them (one value per kind of layer).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, named in (("lora_unet_", named_unet), (te_prefix, named_text)):
        for name, module in named:
            key = prefix + name.replace(".", "_")
            out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = lora_pair(module, rank, g)
            wide = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
            out[key + ".alpha"] = torch.tensor(alphas[1] if wide else alphas[0])
    return out


def peft_lora(
    named_unet: list[tuple[str, nn.Module]], named_text: list[tuple[str, nn.Module]], seed: int, rank: int = 2
) -> dict[str, torch.Tensor]:
    """diffusers' PEFT layout (``save_lora_weights``): ``unet.<name>.lora_A.weight`` / ``lora_B``, no alphas."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, named in (("unet.", named_unet), ("text_encoder.text_model.", named_text)):
        for name, module in named:
            out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = lora_pair(module, rank, g)
    return out


def old_diffusers_lora(named_unet: list[tuple[str, nn.Module]], seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """diffusers' attention-processor layout (2023): ``unet.<attn>.processor.to_q_lora.down.weight``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in named_unet:
        attention, _, projection = name.rpartition(".")
        if projection == "0" and attention.endswith(".to_out"):
            attention, projection = attention.removesuffix(".to_out"), "to_out"
        if projection not in ("to_q", "to_k", "to_v", "to_out") or not attention.endswith(("attn1", "attn2")):
            continue
        down, up = lora_pair(module, rank, g)
        out[f"unet.{attention}.processor.{projection}_lora.down.weight"] = down
        out[f"unet.{attention}.processor.{projection}_lora.up.weight"] = up
    return out


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path
