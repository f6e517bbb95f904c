"""LoRA, LoHa and LoKr files merged into the host copy of the weights, so they cost no VRAM and no time per step.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) changes a weight by a
low-rank product; merged with multiplier ``weight``::

    W' = W + weight * (alpha / rank) * up @ down            (Linear; conv weights flattened to 2-D)

``rank = down.shape[0]``; without an ``alpha`` the scale is 1 (diffusers' and the webui's convention). Conv
layers: ``down`` is ``[rank, in, kh, kw]`` (3x3 for kohya's LoCon), ``up`` ``[out, rank, 1, 1]``; an optional
``lora_mid`` ``[rank, rank, kh, kw]`` is LyCORIS' CP-decomposed core. LyCORIS (Yeh et al. 2024, "Navigating
Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation") adds LoHa,
``(w1a @ w1b) * (w2a @ w2b)`` (Hadamard product, FedPara), and LoKr, ``kron(w1, w2)`` (Kronecker product),
both scaled by ``alpha / dim``; a LoKr whose factors are both full matrices is not scaled.

Every delta is computed in float32 on the weight's device, summed over all files touching that weight,
added to ``W`` in float32 and cast back once; the parameter gets new storage (``param.data = ...``), so
memory-mapped checkpoint pages are never written. This happens right after loading, before a residency
mode moves anything: every memory mode then streams the merged weights exactly as it streams plain ones.

Key layouts are in :mod:`ldm.loading.lora_layouts`. Files are read with :func:`ldm.checkpoints.reader.read_checkpoint`
(safetensors, or a ``.pt`` / ``.ckpt`` through its restricted unpickler).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.loading.errors import LoraError
from ldm.checkpoints.reader import read_checkpoint
from ldm.checkpoints.hashes import file_sha256, safetensors_data_sha256
from ldm.loading.lora_layouts import LoraTarget, lora_targets, split_lora_key
from ldm.loading.stable_diffusion import StableDiffusion

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
_LORA_PARTS = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"})
_LOHA_PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"})
_LOKR_PARTS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"})
# Parts of the layouts we do not merge, for a message that names what the file is.
_OTHER_LAYOUTS = (
    ("dora_scale", "DoRA"),
    ("oft_", "OFT"),
    ("diff", "LyCORIS full-weight difference"),
    ("b_norm", "LyCORIS norm"),
    ("w_norm", "LyCORIS norm"),
    ("on_input", "(IA)^3"),
    ("a1.weight", "GLoRA"),
)




@dataclass(frozen=True)
class ModuleChange:
    """One file's tensors for one weight, with the scale the file gives them (alpha / rank, or 1)."""

    target: LoraTarget
    kind: str  # "lora" | "loha" | "lokr"
    parts: dict[str, torch.Tensor]
    scale: float


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file matched against a model: what it changes and what the metadata needs."""

    path: Path
    name: str  # the file name without its suffix, as the webui names a LoRA
    short_hash: str
    changes: tuple[ModuleChange, ...]
    unmatched_keys: int = 0
    components: frozenset[str] = field(default_factory=frozenset)  # "unet", "text_encoder"


# ---------------------------------------------------------------------------------------------------
# Reading and matching
# ---------------------------------------------------------------------------------------------------


def load_lora(path: str | os.PathLike[str], targets: dict[str, LoraTarget]) -> LoraFile:
    """Read a LoRA file and match its keys to ``targets`` (see :func:`ldm.loading.lora_layouts.lora_targets`).

    Keys that match no module are counted and reported in one warning line; a file none of whose keys
    match, or that holds a layout we do not merge (DoRA, OFT, ...), raises :class:`LoraError`.
    """
    file = Path(path)
    try:
        tensors = read_checkpoint(file)
    except CheckpointError as error:
        raise LoraError(str(error).replace("checkpoint not found", "LoRA file not found")) from error
    metadata = _safetensors_metadata(file)
    try:
        grouped, unmatched = _group_by_module(tensors, targets)
        peft_config = _peft_adapter_config(metadata)
        changes = tuple(_module_change(name, targets[name], parts, peft_config) for name, parts in grouped.items())
    except LoraError as error:
        raise LoraError(f"{file}: {error}") from None
    if not changes:
        raise LoraError(
            f"{file}: none of its {len(tensors)} keys names a layer of this model "
            "(not an SD v1 LoRA in a kohya, webui or diffusers layout?)"
        )
    if unmatched:
        log.warning("%s: %d of %d keys match no layer of this model and are ignored", file.name, unmatched, len(tensors))
    return LoraFile(
        path=file,
        name=file.stem,
        short_hash=lora_short_hash(file, metadata),
        changes=changes,
        unmatched_keys=unmatched,
        components=frozenset(change.target.component for change in changes),
    )


def _group_by_module(
    tensors: dict[str, torch.Tensor], targets: dict[str, LoraTarget]
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = 0
    for key, tensor in tensors.items():
        split = split_lora_key(key)
        if split is not None:
            _refuse_other_layouts(split[0], {split[1]})  # also on norm layers, which no LoRA targets
        if split is None or split[0] not in targets:
            unmatched += 1
            continue
        name, part = split
        grouped.setdefault(name, {})[part] = tensor
    return grouped, unmatched


def _module_change(name: str, target: LoraTarget, parts: dict[str, torch.Tensor], peft_config: dict) -> ModuleChange:
    kind = _kind_of(name, set(parts))
    alpha = parts.get("alpha")
    if kind == "lora":
        rank = parts["lora_down.weight"].shape[0]
        if alpha is None:
            return ModuleChange(target, kind, parts, _peft_scale(name, rank, peft_config))
    elif kind == "loha":
        rank = parts["hada_w1_b"].shape[0]
    else:
        decomposed = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        rank = decomposed.shape[0] if decomposed is not None else None
        if rank is None:  # both Kronecker factors are full matrices: LyCORIS applies no scale
            alpha = None
    scale = 1.0 if alpha is None else float(alpha.float().item()) / rank
    return ModuleChange(target, kind, parts, scale)


def _kind_of(name: str, parts: set[str]) -> str:
    if {"lora_down.weight", "lora_up.weight"} <= parts and parts <= _LORA_PARTS:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts and parts <= _LOHA_PARTS:
        return "loha"
    has_w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    if has_w1 and has_w2 and parts <= _LOKR_PARTS:
        return "lokr"
    raise LoraError(f"layer {name} has parts {', '.join(sorted(parts))}, which is no LoRA, LoHa or LoKr layout")


def _refuse_other_layouts(name: str, parts: set[str]) -> None:
    for marker, layout in _OTHER_LAYOUTS:
        if any(part.startswith(marker) for part in parts):
            raise LoraError(f"{layout} networks are not supported (layer {name}); use a LoRA, LoHa or LoKr file")


def _safetensors_metadata(file: Path) -> dict[str, str]:
    if file.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _peft_adapter_config(metadata: dict[str, str]) -> dict:
    """diffusers' ``lora_adapter_metadata`` (the PEFT ``LoraConfig`` per component, keys ``unet.lora_alpha``...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _peft_scale(name: str, rank: int, config: dict) -> float:
    """PEFT's scale for a module without an ``alpha`` key: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA),
    ``alpha_pattern`` matched as PEFT's ``get_pattern_key`` does; 1 when the file carries no config."""
    component, _, module = name.partition(".")
    if f"{component}.lora_alpha" not in config:
        return 1.0
    if config.get(f"{component}.use_dora"):
        raise LoraError(f"DoRA networks are not supported (layer {name}); use a LoRA, LoHa or LoKr file")
    alpha = config[f"{component}.lora_alpha"]
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank)


# ---------------------------------------------------------------------------------------------------
# The weight changes
# ---------------------------------------------------------------------------------------------------


def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` with conv factors flattened: ``[out, r(,1,1)] @ [r, in(,kh,kw)] -> [out, in*kh*kw]``."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP / Tucker rebuild ``W[i, j, k, l] = sum_{n,m} core[n, m, k, l] a[n, i] b[m, j]``, with
    ``a`` ``[r, out]`` and ``b`` ``[r, in]`` (LoHa's ``hada_t*`` and LoKr's ``lokr_t2`` store them so)."""
    return torch.einsum("nmkl,ni,mj->ijkl", core, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def change_delta(change: ModuleChange, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The float32 ``delta W`` of one file's change of one weight, times its scale, in the weight's shape."""
    p = {name: tensor.to(device=device, dtype=torch.float32) for name, tensor in change.parts.items()}
    if change.kind == "lora":
        if "lora_mid.weight" in p:
            # lora_mid: the core between down ([r, in]) and up ([out, r]).
            up = p["lora_up.weight"].reshape(p["lora_up.weight"].shape[0], -1)
            delta = _tucker(p["lora_mid.weight"], up.T, p["lora_down.weight"])
        else:
            delta = _product(p["lora_up.weight"], p["lora_down.weight"])
    elif change.kind == "loha":
        delta = _loha_factor(p, "1") * _loha_factor(p, "2")
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else _product(p["lokr_w1_a"], p["lokr_w1_b"])
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = _product(p["lokr_w2_a"], p["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1.contiguous(), w2.contiguous())
    if delta.numel() != math.prod(shape):
        raise LoraError(
            f"layer {change.target.component}.{change.target.path}: the LoRA's change has shape "
            f"{tuple(delta.shape)}, the model's weight {tuple(shape)} (a LoRA for another model, such as SD 2 or SDXL?)"
        )
    return delta.reshape(shape) * change.scale


def _loha_factor(p: dict[str, torch.Tensor], index: str) -> torch.Tensor:
    a, b, core = p[f"hada_w{index}_a"], p[f"hada_w{index}_b"], p.get(f"hada_t{index}")
    return _product(a, b) if core is None else _tucker(core, a, b)


@torch.no_grad()
def merge_loras(loras: Sequence[tuple[LoraFile, float]]) -> int:
    """Add every ``(file, weight)`` to the weights it names; returns how many weights changed.

    Per weight: the sum of ``weight * delta`` over the files, in float32, added to the float32 weight and
    cast back once. A weight of 0 leaves the model untouched, bit for bit.
    """
    per_module: dict[int, list[tuple[LoraFile, ModuleChange, float]]] = {}
    for lora, weight in loras:
        if weight != 0:
            for change in lora.changes:
                per_module.setdefault(id(change.target.module), []).append((lora, change, weight))
    for changes in per_module.values():
        parameter = changes[0][1].target.module.weight
        total = parameter.detach().to(torch.float32, copy=True)
        for lora, change, weight in changes:
            try:
                total += weight * change_delta(change, parameter.shape, parameter.device)
            except LoraError as error:
                raise LoraError(f"{lora.path}: {error}") from None
        parameter.data = total.to(parameter.dtype)  # new storage: mapped checkpoint pages stay untouched
    return len(per_module)


def apply_loras(sd: StableDiffusion, requests: Sequence[tuple[str | os.PathLike[str], float]]) -> list[tuple[LoraFile, float]]:
    """Load each ``(path, weight)`` against a loaded :class:`~ldm.loading.stable_diffusion.StableDiffusion` and merge them.

    Call it right after loading, before a ``Residency`` exists. Returns the files with their weights, for the
    metadata (:func:`lora_hashes_text`) and the embedding cache key (:func:`text_encoder_lora_key`).
    """
    if not requests:
        return []
    targets = lora_targets(sd.unet, sd.text_encoder.transformer, sd.config.unet)
    loaded = [(load_lora(path, targets), float(weight)) for path, weight in requests]
    changed = merge_loras(loaded)
    log.info("merged %d LoRA file(s) into %d weights", len(loaded), changed)
    return loaded


def text_encoder_lora_key(loras: Sequence[tuple[LoraFile, float]]) -> str:
    """The part of the LoRA set that changes the text encoder, as text to add to an embedding cache's key:
    each such file's content hash and weight, in merge order; "" when none does.

    Cached prompt encodings are then never reused across LoRA sets that give other conditioning, while
    UNet-only LoRAs leave the key (and the cache hits) as without LoRA.
    """
    touching = [f"{lora.short_hash}*{weight!r}" for lora, weight in loras if weight != 0 and "text_encoder" in lora.components]
    return "lora " + " ".join(touching) if touching else ""


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------


def lora_short_hash(path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> str:
    """The webui's LoRA ``shorthash``: the first 12 hex digits of a sha256 (``extensions-builtin/Lora/network.py``).

    For ``.safetensors`` it is kohya's / additional-networks' hash, the sha256 of everything after the JSON
    header (the tensor data, so editing the metadata keeps the hash), or the ``sshs_model_hash`` the trainer
    stored in the header; for other files the sha256 of the whole file.
    """
    file = Path(path)
    if metadata is None:
        metadata = _safetensors_metadata(file)
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:12]
    digest = safetensors_data_sha256(file) if file.suffix.lower() == ".safetensors" else file_sha256(file)
    return digest[:12]


def lora_hashes_text(loras: Sequence[tuple[LoraFile, float]], names: Sequence[str] | None = None) -> str | None:
    """The webui's ``Lora hashes`` value, ``name: hash, name: hash`` (``:`` and ``,`` removed from names).

    ``names``: the names the user gave (the ``<lora:NAME:...>`` tag's NAME), default the file names.
    """
    labels = names if names is not None else [lora.name for lora, _ in loras]
    entries: dict[str, str] = {}
    for label, (lora, _) in zip(labels, loras):
        entries[label.replace(":", "").replace(",", "")] = lora.short_hash
    return ", ".join(f"{name}: {short}" for name, short in entries.items()) or None


# ---------------------------------------------------------------------------------------------------
# Naming LoRAs on the command line and in prompts
# ---------------------------------------------------------------------------------------------------

# The webui's extra-network syntax (modules/extra_networks.py, ``re_extra_net``): <kind:arg:arg...>.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TAG_KINDS = ("lora", "lyco")  # the webui reads <lyco:...> as <lora:...> since 1.5


def parse_lora_argument(text: str) -> tuple[str, float]:
    """``--lora FILE[:WEIGHT]`` -> ``(FILE, WEIGHT)``; the weight defaults to 1.0 and may be negative.

    Only a suffix that parses as a number is a weight, so ``C:\\loras\\x.safetensors`` stays a path.
    """
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The webui's ``<lora:NAME:WEIGHT>`` tags: the prompt without any extra-network tag (the webui removes
    every ``<kind:args>``, whatever the kind, before encoding) and the LoRA tags' ``[(NAME, WEIGHT), ...]``.

    WEIGHT defaults to 1.0 (the webui's ``extra_networks_default_multiplier``). The webui reads a third
    field as a separate UNet weight; here one weight applies to the whole file, so a tag with more fields
    is refused rather than merged differently.
    """
    found: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        if match[1].lower() not in _LORA_TAG_KINDS:
            return ""
        name, *fields = match[2].split(":")
        if len(fields) > 1 or any("=" in value for value in fields):
            raise LoraError(f"{match[0]}: only <lora:NAME> and <lora:NAME:WEIGHT> are supported")
        try:
            weight = float(fields[0]) if fields else 1.0
        except ValueError:
            raise LoraError(f"{match[0]}: the weight must be a number") from None
        found.append((name.strip(), weight))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def other_extra_networks(prompt: str) -> list[str]:
    """The prompt's extra-network tags of kinds other than LoRA (``<hypernet:...>``): removed, not applied."""
    return [match[0] for match in _EXTRA_NETWORK.finditer(prompt) if match[1].lower() not in _LORA_TAG_KINDS]


def find_lora_file(name: str, lora_dir: str | os.PathLike[str]) -> Path:
    """The file a prompt's ``<lora:NAME>`` means: ``NAME`` plus a LoRA suffix under ``lora_dir`` (subfolders too)."""
    folder = Path(lora_dir)
    candidates = sorted(
        path for path in folder.rglob("*") if path.suffix.lower() in LORA_SUFFIXES and path.stem == name
    ) if folder.is_dir() else []
    if not candidates:
        raise LoraError(f"<lora:{name}>: no {name}.safetensors / .pt / .ckpt / .bin in {folder}")
    if len(candidates) > 1:
        log.warning("<lora:%s>: %d files have that name; using %s", name, len(candidates), candidates[0])
    return candidates[0]
