"""ControlNet files as people have them, read without running their code and built into a
:class:`~ldm.control.network.ControlNet`.

Layouts (decided from the keys, :func:`control_layout`):

- ControlNet 1.1 (``control_v11p_sd15_canny.pth``, the webui's pruned ``.safetensors``): ``time_embed.*``,
  ``input_blocks.*``, ``middle_block.*``, ``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``.
- ControlNet 1.0 (``control_sd15_canny.pth``): the same under ``control_model.``, with or without the base
  model's own ``model.diffusion_model.*`` / ``first_stage_model.*`` / ``cond_stage_model.*`` keys (ignored).
- diffusers (``ControlNetModel.save_pretrained``): a folder with ``config.json`` and
  ``diffusion_pytorch_model[.fp16].safetensors`` (or ``.bin``), or that weights file alone; renamed to the
  CompVis keys by :mod:`ldm.control.diffusers_layout`.

Everything else is one :class:`ControlFileError` line saying what the file is: an SDXL or SD 2 ControlNet (by
its extra embeddings or its cross-attention width), a T2I-Adapter, a Stable Diffusion checkpoint, a LoRA or
VAE, a truncated file. Files go through :func:`ldm.checkpoints.reader.read_checkpoint` (``.pth`` through the
restricted unpickler).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ldm.checkpoints.diffusers_folders import read_component
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.kinds import CheckpointKind, classify_checkpoint
from ldm.checkpoints.reader import read_checkpoint
from ldm.config import UNetConfig
from ldm.control.diffusers_layout import compvis_control_from_diffusers, looks_like_diffusers_control
from ldm.control.errors import ControlFileError
from ldm.control.network import ControlNet

log = logging.getLogger(__name__)

V10_PREFIX = "control_model."  # ControlNet 1.0's files: the ControlLDM's attribute
V11 = "ControlNet 1.1"
V10 = "ControlNet 1.0"
DIFFUSERS = "diffusers ControlNet"
_OWN_KEYS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
SD_V1_CONTEXT_DIM = 768
_CONTEXT_NAMES = {1024: "an SD 2.x ControlNet (1024-wide text context)", 2048: "an SDXL ControlNet (2048-wide text context)"}


def read_control_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The ControlNet weights of ``path`` (file or diffusers folder) under CompVis keys, and the layout's name."""
    try:
        if path.is_dir():
            config = path / "config.json"
            if not config.is_file():
                raise ControlFileError(f"--control_model {path}: a folder without config.json (a diffusers ControlNet "
                                       "folder has config.json and diffusion_pytorch_model.safetensors)")
            state = read_component(path)
        else:
            state = read_checkpoint(path)
    except CheckpointError as error:
        raise ControlFileError(f"--control_model: {error}") from None
    return control_layout(state, path)


def control_layout(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` as a v1.1 state dict, and which layout it came in; one line for anything else."""
    refuse_other_kinds(state, path)
    if any(k.startswith(V10_PREFIX) for k in state):
        inner = {k[len(V10_PREFIX):]: v for k, v in state.items() if k.startswith(V10_PREFIX)}
        return inner, V10
    if looks_like_diffusers_control(state):
        return compvis_control_from_diffusers(state), DIFFUSERS
    if any(k.startswith(_OWN_KEYS) for k in state):
        return dict(state), V11
    kind = classify_checkpoint(state)
    what = "not a ControlNet" if kind is CheckpointKind.UNKNOWN else f"{kind.value}, not a ControlNet"
    hint = " (pass it with --ckpt)" if kind in (CheckpointKind.SD_V1, CheckpointKind.SD_V1_INPAINTING) else ""
    raise ControlFileError(f"--control_model {path}: {what}{hint}; expected an SD v1 ControlNet "
                           "(control_v11p_sd15_*.pth, control_sd15_*.pth or a diffusers ControlNet folder)")


def refuse_other_kinds(state: dict[str, torch.Tensor], path: Path) -> None:
    """T2I-Adapters, SDXL and SD 2 ControlNets, each by its own sign."""
    keys = list(state)
    if any(k.startswith(("body.", "adapter.body.", "adapter.conv_in.")) for k in keys):
        raise ControlFileError(f"--control_model {path}: a T2I-Adapter, not a ControlNet: not supported")
    if any(k.endswith(("label_emb.0.0.weight", "add_embedding.linear_1.weight")) for k in keys):
        raise ControlFileError(f"--control_model {path}: an SDXL ControlNet; this program runs SD v1 "
                               "(use an SD 1.5 ControlNet, e.g. control_v11p_sd15_*)")
    width = context_width(state)
    if width is not None and width != SD_V1_CONTEXT_DIM and width in _CONTEXT_NAMES:
        raise ControlFileError(f"--control_model {path}: {_CONTEXT_NAMES[width]}; this program runs SD v1 "
                               "(use an SD 1.5 ControlNet, e.g. control_v11p_sd15_*)")


def context_width(state: dict[str, torch.Tensor]) -> int | None:
    """The text-context width of the file's cross-attention (768 for SD v1), from its first ``attn2.to_k``."""
    for key, value in state.items():
        if key.endswith("attn2.to_k.weight") and value.ndim == 2 and not key.startswith("model.diffusion_model."):
            return int(value.shape[1])
    return None


def build_control_net(state: dict[str, torch.Tensor], config: UNetConfig, dtype: torch.dtype, path: Path) -> ControlNet:
    """A :class:`ControlNet` of ``config``'s UNet with ``state`` loaded strictly, in ``dtype``, each weight a copy
    of its own (no view into a file's memory map is kept)."""
    with torch.device("meta"):
        net = ControlNet(config)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    problems = [f"{what} {len(names)} keys ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("shape differs for", mismatched))
                if names]
    if problems:
        raise ControlFileError(f"--control_model {path}: not a ControlNet of this model's UNet "
                               f"({'; '.join(problems)}); is it an SD v1 ControlNet, and does --config match?")
    weights = {k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def load_control_net(path: Path, config: UNetConfig, dtype: torch.dtype) -> ControlNet:
    """Read ``path`` (any layout above) and build its network in ``dtype``."""
    state, layout = read_control_weights(path)
    net = build_control_net(state, config, dtype, path)
    log.info("%s: %s, %.0fM parameters", path, layout, sum(p.numel() for p in net.parameters()) / 1e6)
    return net


def webui_model_hash(path: str | os.PathLike) -> str:
    """The webui's old short model hash (``sd_models.model_hash``), which the ControlNet extension writes after a
    model's name (``control_v11p_sd15_canny [d14c016b]``): sha256 of the 64 KiB at 1 MiB, 8 hex digits. A
    folder: its weights file's."""
    path = Path(path)
    if path.is_dir():
        path = next(iter(sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))), path / "config.json")
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
