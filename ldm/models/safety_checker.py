"""Stable Diffusion's safety checker, read from a local diffusers-format folder (off unless asked for).

What it is: CompVis' ``scripts/txt2img.py::check_safety`` and diffusers' ``StableDiffusionSafetyChecker``
(the ``safety_checker/`` folder of the SD v1.x repositories, or ``CompVis/stable-diffusion-safety-checker``).
A CLIP ViT-L/14 vision tower (``transformers.CLIPVisionModel``; Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision") embeds each image; ``visual_projection`` maps the pooled
output into CLIP's joint space; the image is flagged when its cosine similarity to one of 17 "concept"
embeddings exceeds that concept's threshold (``concept_embeds_weights``). Three "special care" embeddings
(``special_care_embeds`` / ``special_care_embeds_weights``) lower every later threshold by 0.01 once one of
them is exceeded. Scores are rounded to 3 decimals before the comparison, in float32, as diffusers'
``forward`` does (``round(cos - threshold + adjustment, 3) > 0``); the flags are therefore the same bits.

Inputs: the folder's feature extractor settings (``preprocessor_config.json`` of ``CLIPImageProcessor``:
shortest edge resized with Pillow (bicubic), centre crop, rescale by 1/255, normalize by CLIP's mean/std),
implemented here with Pillow and numpy exactly as transformers' Pillow backend does it.

Files (nothing is downloaded; no weights ship with this repository):
``DIR`` may be the ``safety_checker/`` folder itself (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, or their ``.fp16`` variants) or a pipeline folder holding ``safety_checker/``.
The preprocessor settings are looked for in ``DIR``, then in a sibling ``feature_extractor/`` folder;
without one, CLIP's standard settings (224 px, the values of every SD v1 ``feature_extractor``) apply.
``.bin`` files are read by :func:`ldm.checkpoints.reader.read_checkpoint` (no code runs from the file).
Keys written by transformers 4.x (``vision_model.vision_model.*``, ``*.position_ids``) and 5.x
(``vision_model.*``) are both accepted; anything else missing or extra is an error naming the keys.

Modes for a flagged image (:func:`censor`): ``black`` (diffusers and CompVis both return a black
image; CompVis shows a placeholder picture), ``blur`` (a Gaussian blur of radius min(H, W)/8: the
composition stays visible, details do not), ``warn`` (kept as it is; only the flag is reported).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.reader import read_checkpoint
from ldm.errors import UserError

log = logging.getLogger(__name__)

MODES = ("black", "blur", "warn")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (transformers OPENAI_CLIP_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers: once a special-care concept fires, every later threshold drops by this
SCORE_DECIMALS = 3
_LEGACY_PREFIX = "vision_model.vision_model."  # transformers 4.x nested the vision tower once more


class SafetyCheckerError(UserError):
    """A safety checker folder that cannot be used; the message is one line and names the file."""


@dataclass(frozen=True)
class ImagePreprocessor:
    """``CLIPImageProcessor``'s settings and its Pillow-backend arithmetic for RGB ``uint8`` images."""

    shortest_edge: int | None = 224  # None: resize to exactly (height, width)
    height: int | None = None
    width: int | None = None
    crop_height: int = 224
    crop_width: int = 224
    resample: int = Image.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_config(cls, config: dict) -> ImagePreprocessor:
        """From a ``preprocessor_config.json`` dict (current ``{"shortest_edge": 224}`` or legacy ``224`` sizes)."""
        size = config.get("size", 224)
        crop = config.get("crop_size", 224)
        if isinstance(size, int):  # CLIP's legacy int size means the shortest edge (default_to_square=False)
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "shortest_edge" not in size and not ("height" in size and "width" in size):
            raise ValueError(f"unsupported size {size}: expected shortest_edge or height and width")
        return cls(
            shortest_edge=size.get("shortest_edge"), height=size.get("height"), width=size.get("width"),
            crop_height=int(crop["height"]), crop_width=int(crop["width"]),
            resample=int(config.get("resample", Image.BICUBIC)),
            do_resize=bool(config.get("do_resize", True)), do_center_crop=bool(config.get("do_center_crop", True)),
            do_rescale=bool(config.get("do_rescale", True)), rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            mean=tuple(config.get("image_mean", CLIP_MEAN)), std=tuple(config.get("image_std", CLIP_STD)),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: the shorter edge to ``shortest_edge``, the other ``int()``-scaled."""
        if self.shortest_edge is None:
            return self.height, self.width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def one(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[3, h, w]`` float32 model input."""
        if self.do_resize:
            height, width = self.resized_size(*image.shape[:2])
            image = np.asarray(Image.fromarray(image).resize((width, height), resample=self.resample))
        chw = np.moveaxis(image, -1, 0)
        if self.do_center_crop:
            chw = _center_crop(chw, self.crop_height, self.crop_width)
        out = chw.astype(np.float64) * self.rescale_factor if self.do_rescale else chw
        out = out.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            out = (out - mean) / std
        return out

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """A batch of RGB uint8 ``[H, W, 3]`` images -> ``pixel_values`` ``[B, 3, h, w]`` float32."""
        return torch.from_numpy(np.stack([self.one(np.asarray(image, dtype=np.uint8)) for image in images]))


def _center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' ``center_crop``: top-left at ``(H - h) // 2``; zero padding (centred, rounded up) when smaller."""
    _, h, w = chw.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + height, left : left + width]
    padded = np.zeros((chw.shape[0], max(h, height), max(w, width)), dtype=chw.dtype)
    pad_top, pad_left = -(-(padded.shape[1] - h) // 2), -(-(padded.shape[2] - w) // 2)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = chw
    _, h, w = padded.shape
    top, left = (h - height) // 2, (w - width) // 2
    return padded[:, top : top + height, left : left + width]


@dataclass(frozen=True)
class SafetyVerdict:
    """One image's result: flagged when any concept's rounded score is above zero."""

    flagged: bool
    concepts: tuple[int, ...] = ()  # indices of the concepts over their threshold
    special: tuple[int, ...] = ()  # indices of the special-care concepts over theirs


class SafetyChecker(nn.Module):
    """The CLIP vision tower, the projection and the concept embeddings, under diffusers' state-dict names."""

    def __init__(self, vision_config, projection_dim: int, n_concepts: int = 17, n_special: int = 3) -> None:
        from transformers import CLIPVisionModel

        super().__init__()
        self.vision_model = CLIPVisionModel(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(n_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(n_special, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(n_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(n_special), requires_grad=False)

    @torch.no_grad()
    def cosine_similarities(self, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(special-care, concept) cosine similarities, ``[B, 3]`` and ``[B, 17]`` float32 on the CPU."""
        dtype = self.visual_projection.weight.dtype
        pooled = self.vision_model(pixel_values.to(self.visual_projection.weight.device, dtype)).pooler_output
        embeds = nn.functional.normalize(self.visual_projection(pooled))

        def cosine(concepts: torch.Tensor) -> np.ndarray:
            return (embeds @ nn.functional.normalize(concepts).t()).cpu().float().numpy()

        return cosine(self.special_care_embeds), cosine(self.concept_embeds)

    def forward(self, pixel_values: torch.Tensor) -> list[SafetyVerdict]:
        special_cos, concept_cos = self.cosine_similarities(pixel_values)
        special_thresholds = self.special_care_embeds_weights.detach().cpu().float().numpy()
        concept_thresholds = self.concept_embeds_weights.detach().cpu().float().numpy()
        return [
            _verdict(special_cos[i], concept_cos[i], special_thresholds, concept_thresholds)
            for i in range(special_cos.shape[0])
        ]


def _verdict(special_cos: np.ndarray, concept_cos: np.ndarray, special_thr: np.ndarray, concept_thr: np.ndarray) -> SafetyVerdict:
    """diffusers' per-image loop: the adjustment applies to the special concepts after the first one that
    fires and then to all concepts; each score is ``round(cos - threshold + adjustment, 3)`` in float32."""
    adjustment = np.float32(0.0)
    special = []
    for index in range(special_cos.shape[0]):
        if np.round(special_cos[index] - special_thr[index] + adjustment, SCORE_DECIMALS) > 0:
            special.append(index)
            adjustment = np.float32(SPECIAL_CARE_ADJUSTMENT)
    scores = np.round(concept_cos - concept_thr + adjustment, SCORE_DECIMALS)
    concepts = tuple(int(i) for i in np.nonzero(scores > 0)[0])
    return SafetyVerdict(flagged=bool(concepts), concepts=concepts, special=tuple(special))


def censor(image: np.ndarray, mode: str) -> np.ndarray:
    """What a flagged ``[H, W, 3]`` uint8 image becomes under ``mode`` (see the module docstring)."""
    if mode == "black":
        return np.zeros_like(image)
    if mode == "blur":
        radius = max(1.0, min(image.shape[:2]) / 8)
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    if mode == "warn":
        return image
    raise ValueError(f"unknown safety checker mode {mode!r}; choose one of {', '.join(MODES)}")


@dataclass(frozen=True)
class SafetyCheckerFiles:
    """Where a safety checker's files are: its folder, the weights file and the preprocessor settings."""

    folder: Path
    weights: Path
    preprocessor_config: Path | None


def find_safety_checker_files(directory: str | Path) -> SafetyCheckerFiles:
    """Resolve ``DIR`` (the ``safety_checker/`` folder or a pipeline folder holding one) to its files."""
    root = Path(directory)
    if not root.is_dir():
        raise SafetyCheckerError(f"safety checker folder not found: {root}")
    folder = root / "safety_checker" if not (root / "config.json").is_file() and (root / "safety_checker").is_dir() else root
    if not (folder / "config.json").is_file():
        raise SafetyCheckerError(f"{folder} has no config.json: not a diffusers safety_checker folder")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise SafetyCheckerError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    candidates = (folder / "preprocessor_config.json", folder.parent / "feature_extractor" / "preprocessor_config.json")
    preprocessor = next((path for path in candidates if path.is_file()), None)
    return SafetyCheckerFiles(folder, weights, preprocessor)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetyCheckerError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise SafetyCheckerError(f"cannot read {path}: expected a JSON object")
    return value


def vision_config_from(config: dict, path: Path):
    """``CLIPVisionConfig`` from a ``CLIPConfig`` dict; the legacy ``vision_config_dict`` overrides, as in transformers 4."""
    from transformers import CLIPVisionConfig

    fields = dict(config.get("vision_config") or {})
    fields.update(config.get("vision_config_dict") or {})
    fields.pop("model_type", None)
    try:
        return CLIPVisionConfig(**fields)
    except (TypeError, ValueError) as error:
        raise SafetyCheckerError(f"{path}: invalid vision_config: {str(error).splitlines()[-1].strip()}") from None


def normalize_safety_checker_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.x names (``vision_model.vision_model.*``, stored ``position_ids``) -> the current ones."""
    out = {}
    for key, tensor in weights.items():
        if key.endswith("position_ids"):
            continue  # a non-persistent buffer in transformers >= 4.31, rebuilt on load
        if key.startswith(_LEGACY_PREFIX):
            key = "vision_model." + key[len(_LEGACY_PREFIX):]
        out[key] = tensor
    return out


def _describe(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_keys(module: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = ([f"missing {len(missing)} keys ({_describe(missing)})"] if missing else []) + (
        [f"unexpected {len(unexpected)} keys ({_describe(unexpected)})"] if unexpected else []) + (
        [f"{len(mismatched)} shapes differ from config.json ({_describe(mismatched, 3)})"] if mismatched else [])
    if problems:
        raise SafetyCheckerError(f"{path}: {'; '.join(problems)}")


def load_safety_checker(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[SafetyChecker, ImagePreprocessor]:
    """The checker (CPU, eval mode, ``dtype``) and its preprocessing from a local folder; raises
    :class:`SafetyCheckerError` (one line naming the file) for anything missing, damaged or mismatched."""
    files = find_safety_checker_files(directory)
    config_path = files.folder / "config.json"
    config = _read_json(config_path)
    vision_config = vision_config_from(config, config_path)
    try:
        weights = normalize_safety_checker_keys(read_checkpoint(files.weights))
    except CheckpointError as error:
        raise SafetyCheckerError(str(error)) from None
    projection = weights.get("visual_projection.weight")
    concepts, special = weights.get("concept_embeds"), weights.get("special_care_embeds")
    if projection is None or concepts is None or special is None:
        raise SafetyCheckerError(f"{files.weights}: no visual_projection / concept embeddings: not a safety checker")
    with torch.device("meta"):
        checker = SafetyChecker(vision_config, projection.shape[0], concepts.shape[0], special.shape[0])
    _check_keys(checker, weights, files.weights)
    checker.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()},
                            strict=True, assign=True)
    for module in checker.modules():  # non-persistent buffers (CLIP's position_ids) are not in any file
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if name != "position_ids":
                    raise SafetyCheckerError(f"{files.weights}: buffer {name} was not set by the file")
                module._buffers[name] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
    checker.eval().requires_grad_(False)
    preprocessor = ImagePreprocessor()
    if files.preprocessor_config is not None:
        try:
            preprocessor = ImagePreprocessor.from_config(_read_json(files.preprocessor_config))
        except (KeyError, TypeError, ValueError) as error:
            raise SafetyCheckerError(f"{files.preprocessor_config}: {error}") from None
    else:
        log.info("%s: no preprocessor_config.json beside it; using CLIP's standard 224 px settings", files.folder)
    log.info("safety checker from %s (%d concepts)", files.weights, concepts.shape[0])
    return checker, preprocessor


def check_images(checker: SafetyChecker, preprocessor: ImagePreprocessor, images: Sequence[np.ndarray]) -> list[SafetyVerdict]:
    """Verdicts for RGB uint8 ``[H, W, 3]`` images, computed wherever ``checker`` currently lives."""
    return checker(preprocessor(images))
